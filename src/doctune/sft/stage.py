"""SFT: chat examples rendered with the model's own chat template, loss on the assistant reply only.

Each record is tokenized here, once: the prompt (system + user, with the generation prompt) carries -100,
the reply and its end-of-turn token carry their ids. An example longer than `max_length` loses tokens
from the middle of the user turn, where edge-ordered retrieved passages are least relevant; the
question at its end and the reply are never cut.
"""

from __future__ import annotations

from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.chat import InvalidMessages, render_ids, with_user_cut
from doctune.citations import cited_but_not_shown
from doctune.config import RunConfig
from doctune.records import (
    ABSTENTIONS_FILE,
    LEGACY_ABSTENTION_FILE,
    SYSTEM_PROMPT_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    SkipRecord,
    read_jsonl,
    read_text_file,
    sft_messages,
)
from doctune.tracking import StageRun
from doctune.train.core import TrainingError
from doctune.train.stage import save_split, train_file, train_stage


def tokenize_example(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one conversation whose last message is the reply to learn."""
    truncated = False
    for _ in range(4):  # re-tokenizing a cut text can shift a few tokens: cut again if needed
        full = render_ids(tokenizer, messages)
        prompt = render_ids(tokenizer, messages[:-1], generation_prompt=True)
        if full[: len(prompt)] != prompt:
            raise TrainingError(
                "the chat template does not render the prompt as a prefix of the whole conversation; "
                "the reply's tokens cannot be told from the prompt's"
            )
        if len(full) <= max_length:
            labels = [-100] * len(prompt) + full[len(prompt) :]
            return full, labels, truncated
        try:
            messages = with_user_cut(tokenizer, messages, len(full) - max_length + 4)
        except InvalidMessages as exc:
            raise SkipRecord(str(exc)) from None
        if lost := cited_but_not_shown(messages, [messages[-1]["content"]]):
            raise SkipRecord(f"cutting the prompt to max_length removed passage(s) {lost} the answer cites")
        truncated = True
    raise SkipRecord("could not be cut to max_length")


def ends_in_end_of_turn(tokenizer, labels: list[int]) -> bool:
    """The last trained token that is not whitespace is the end-of-turn (EOS) token."""
    trained = [t for t in labels if t != -100]
    while trained and not tokenizer.decode([trained[-1]]).strip():
        trained.pop()
    return bool(trained) and trained[-1] == tokenizer.eos_token_id


def tokenize_file(tokenizer, path: Path, max_length: int, skipped: list[dict]) -> tuple[list[list[int]], list[list[int]], int]:
    input_ids, labels, truncated = [], [], 0
    for record in read_jsonl(path, skipped):
        try:
            ids, labs, cut = tokenize_example(tokenizer, sft_messages(record), max_length)
        except SkipRecord as exc:
            skipped.append({"file": path.name, "line": record["_line"], "reason": str(exc)})
            continue
        if not ends_in_end_of_turn(tokenizer, labs):
            raise TrainingError(
                f"{path.name} line {record['_line']}: the rendered reply does not end in the EOS token "
                f"{tokenizer.eos_token!r}; the model would not learn to stop. Fix the chat template or the EOS token."
            )
        input_ids.append(ids)
        labels.append(labs)
        truncated += cut
    return input_ids, labels, truncated


def prepare(config: RunConfig, dataset_dir: Path):
    cfg = config.sft
    train_path = train_file(dataset_dir, "SFT")

    def prepare_data(tokenizer, data_dir: Path) -> dict:
        skipped: list[dict] = []
        ids, labels, truncated = tokenize_file(tokenizer, train_path, cfg.max_length, skipped)
        if not ids:
            reasons = sorted({s["reason"] for s in skipped})
            raise TrainingError(f"SFT dataset {train_path}: no usable example ({len(skipped)} skipped: {reasons[:3]})")
        save_split(data_dir, "train", ids, labels)
        summary = {"train_examples": len(ids), "train_truncated": truncated}
        validation = dataset_dir / VALIDATION_FILE
        if validation.is_file():
            v_ids, v_labels, v_truncated = tokenize_file(tokenizer, validation, cfg.max_length, skipped)
            v_ids, v_labels = v_ids[: cfg.max_eval_examples], v_labels[: cfg.max_eval_examples]
            if v_ids:
                save_split(data_dir, "eval", v_ids, v_labels)
            summary |= {"validation_examples": len(v_ids), "validation_truncated": v_truncated}
        lengths = sorted(len(x) for x in ids)
        summary |= {
            "train_tokens": sum(lengths),
            "trained_tokens": sum(sum(t != -100 for t in lab) for lab in labels),
            "median_length": lengths[len(lengths) // 2],
            "max_length": lengths[-1],
            "skipped_records": len(skipped),
            "skipped": skipped[:100],
        }
        return summary

    return prepare_data


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    dataset_dir = tracker.fetch(inputs["sft"])
    tracker.log_dataset_input(inputs["sft"], dataset_dir / TRAIN_FILE, context="sft")
    texts = {name: read_text_file(dataset_dir, name) for name in (SYSTEM_PROMPT_FILE, ABSTENTIONS_FILE, LEGACY_ABSTENTION_FILE)}
    extra = {name: text for name, text in texts.items() if text is not None}
    return train_stage("sft", config, inputs, tracker, prepare(config, dataset_dir), extra_files=extra)
