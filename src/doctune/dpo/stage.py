"""DPO: preference pairs (grounded answer over a plausible wrong one) on the SFT model, with TRL's DPOTrainer.

Pairs are checked and fitted here: a pair whose prompt plus longer reply exceeds `max_length` loses tokens
from the middle of its user turn (as in SFT), so TRL's end-truncation never cuts a reply.
"""

from __future__ import annotations

from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.sft.stage import ROLES, SkipRecord, cut_middle, render_ids
from doctune.tracking import StageRun
from doctune.train.core import TrainingError
from doctune.train.stage import read_jsonl, train_file, train_stage


def check_pair(record: dict) -> tuple[list[dict], dict, dict]:
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if (
        not isinstance(prompt, list)
        or not prompt
        or any(not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) for m in prompt)
    ):
        raise SkipRecord("field 'prompt' must be a non-empty list of {role, content} messages")
    if prompt[-1]["role"] != "user":
        raise SkipRecord("the prompt must end with a user message")
    replies = []
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        message = reply[-1] if isinstance(reply, list) and reply else None
        if not isinstance(message, dict) or message.get("role") != "assistant" or not str(message.get("content", "")).strip():
            raise SkipRecord(f"field {name!r} must be a non-empty assistant reply")
        replies.append({"role": "assistant", "content": message["content"]})
    if replies[0]["content"] == replies[1]["content"]:
        raise SkipRecord("chosen and rejected are the same reply")
    return [{"role": m["role"], "content": m["content"]} for m in prompt], replies[0], replies[1]


def fit_pair(tokenizer, prompt: list[dict], chosen: dict, rejected: dict, max_length: int) -> tuple[list[dict], bool]:
    """The prompt, cut in the middle of its user turn until prompt + the longer reply fit max_length."""
    truncated = False
    for _ in range(4):
        longest = max(len(render_ids(tokenizer, [*prompt, reply])) for reply in (chosen, rejected))
        if longest <= max_length:
            return prompt, truncated
        prompt = [
            *prompt[:-1],
            {"role": "user", "content": cut_middle(tokenizer, prompt[-1]["content"], longest - max_length + 4)},
        ]
        truncated = True
    raise SkipRecord("could not be cut to max_length")


def load_pairs(tokenizer, path: Path, max_length: int, skipped: list[dict]) -> tuple[list[dict], int]:
    pairs, truncated = [], 0
    for record in read_jsonl(path, skipped):
        try:
            prompt, chosen, rejected = check_pair(record)
            prompt, cut = fit_pair(tokenizer, prompt, chosen, rejected, max_length)
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
        validation = dataset_dir / "validation.jsonl"
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
    tracker.log_dataset_input(inputs["dpo"], dataset_dir / "train.jsonl", context="dpo")
    extra = {name: (dataset_dir / name).read_text() for name in ("system_prompt.txt",) if (dataset_dir / name).is_file()}
    return train_stage("dpo", config, inputs, tracker, prepare(config, dataset_dir), extra_files=extra)
