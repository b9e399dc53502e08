"""DPO: preference pairs (grounded answer over a plausible wrong one) on the SFT model, with TRL's DPOTrainer.

Pairs are checked and fitted here: a pair whose prompt plus longer reply exceeds `max_length` loses tokens
from the middle of its user turn (as in SFT), so TRL's end-truncation never cuts a reply.
"""

from __future__ import annotations

from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.chat import InvalidMessages, render_ids, with_user_cut
from doctune.citations import cited_but_not_shown
from doctune.config import RunConfig
from doctune.records import (
    SYSTEM_PROMPT_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    SkipRecord,
    dpo_pair,
    read_jsonl,
    read_text_file,
)
from doctune.tracking import StageRun
from doctune.train.core import TrainingError
from doctune.train.stage import train_file, train_stage


def fit_pair(tokenizer, prompt: list[dict], chosen: dict, rejected: dict, max_length: int) -> tuple[list[dict], bool]:
    """The prompt, cut in the middle of its user turn until prompt + the longer reply fit max_length."""
    truncated = False
    for _ in range(4):
        longest = max(len(render_ids(tokenizer, [*prompt, reply])) for reply in (chosen, rejected))
        if longest <= max_length:
            return prompt, truncated
        try:
            prompt = with_user_cut(tokenizer, prompt, longest - max_length + 4)
        except InvalidMessages as exc:
            raise SkipRecord(str(exc)) from None
        if lost := cited_but_not_shown(prompt, [chosen["content"], rejected["content"]]):
            raise SkipRecord(f"cutting the prompt to max_length removed passage(s) {lost} the replies cite")
        truncated = True
    raise SkipRecord("could not be cut to max_length")


def load_pairs(tokenizer, path: Path, max_length: int, skipped: list[dict]) -> tuple[list[dict], int]:
    pairs, truncated = [], 0
    for record in read_jsonl(path, skipped):
        try:
            pair = dpo_pair(record)
            chosen, rejected = pair.chosen, pair.rejected
            prompt, cut = fit_pair(tokenizer, pair.prompt, chosen, rejected, max_length)
        except SkipRecord as exc:
            skipped.append({"file": path.name, "line": record["_line"], "reason": str(exc)})
            continue
        pairs.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]})
        truncated += cut
    return pairs, truncated


def prepare(config: RunConfig, dataset_dir: Path):
    cfg = config.dpo
    train_path = train_file(dataset_dir, "DPO")

    def prepare_data(tokenizer, data_dir: Path) -> dict:
        from datasets import Dataset

        skipped: list[dict] = []
        train, truncated = load_pairs(tokenizer, train_path, cfg.max_length, skipped)
        if not train:
            reasons = sorted({s["reason"] for s in skipped})
            raise TrainingError(f"DPO dataset {train_path}: no usable pair ({len(skipped)} skipped: {reasons[:3]})")
        Dataset.from_list(train).save_to_disk(str(data_dir / "train"))
        summary = {"train_pairs": len(train), "train_truncated": truncated}
        validation = dataset_dir / VALIDATION_FILE
        if validation.is_file():
            pairs, v_truncated = load_pairs(tokenizer, validation, cfg.max_length, skipped)
            pairs = pairs[: cfg.max_eval_pairs]
            if pairs:
                Dataset.from_list(pairs).save_to_disk(str(data_dir / "eval"))
            summary |= {"validation_pairs": len(pairs), "validation_truncated": v_truncated}
        return summary | {"skipped_records": len(skipped), "skipped": skipped[:100]}

    return prepare_data


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    dataset_dir = tracker.fetch(inputs["dpo"])
    tracker.log_dataset_input(inputs["dpo"], dataset_dir / TRAIN_FILE, context="dpo")
    system_prompt = read_text_file(dataset_dir, SYSTEM_PROMPT_FILE)
    extra = {SYSTEM_PROMPT_FILE: system_prompt} if system_prompt is not None else {}
    return train_stage("dpo", config, inputs, tracker, prepare(config, dataset_dir), extra_files=extra)
