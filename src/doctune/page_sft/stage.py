"""Page SFT: the vision-language model learns to answer a page image and the instruction with the page's JSON.

Each training page becomes a prompt-completion record (the instruction beside the image; the fields as the schema's
canonical JSON) that TRL's collator turns into the processor's tensors, loss on the reply only. Pages are measured
here, once, with the model's own processor: one whose reply is longer than `max_output_tokens`, or whose image and
reply need more than `max_length` tokens, is left out and reported (truncating it would cut image tokens or teach a
cut JSON). Training itself is doctune's engine (`doctune.train`): LoRA/QLoRA/full, resume, ZeRO-3, MLflow metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.page_schema import canonical_json
from doctune.records import PAGE_INSTRUCTION_FILE, PAGE_SCHEMA_FILE, TRAIN_FILE, VALIDATION_FILE, read_jsonl
from doctune.tracking import StageRun
from doctune.train.core import TrainingError
from doctune.train.stage import train_file, train_stage
from doctune.vision import open_image, page_messages


def read_page_dataset(dataset_dir: Path) -> tuple[dict, str]:
    """(schema, instruction) of a pages dataset."""
    schema_path, instruction_path = dataset_dir / PAGE_SCHEMA_FILE, dataset_dir / PAGE_INSTRUCTION_FILE
    if not schema_path.is_file() or not instruction_path.is_file():
        raise TrainingError(f"pages dataset {dataset_dir.name}: {PAGE_SCHEMA_FILE} or {PAGE_INSTRUCTION_FILE} is missing")
    return json.loads(schema_path.read_text()), instruction_path.read_text()


def measure(processor, image, instruction: str, reply: str) -> tuple[int, int]:
    """(tokens of the whole example, image tokens included; tokens of the reply) as the model sees them."""
    text = processor.apply_chat_template(page_messages(instruction, reply), tokenize=False)
    full = processor(text=[text], images=[[image]], add_special_tokens=False)["input_ids"][0]
    return len(full), len(processor.tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1  # + the EOS


def page_records(processor, dataset_dir: Path, path: Path, settings, schema: dict, instruction: str, skipped: list[dict]):
    """Prompt-completion records of one split, with the images they need; over-long pages are listed in `skipped`."""
    records = []
    for record in read_jsonl(path, skipped):
        where = {"file": path.name, "line": record["_line"], "id": record.get("id")}
        try:
            image = open_image(dataset_dir / record["image"])
            reply = canonical_json(record["fields"], schema)
        except (KeyError, TypeError, OSError) as exc:
            skipped.append(where | {"reason": f"unusable record ({type(exc).__name__}: {exc})"})
            continue
        try:
            total, reply_tokens = measure(processor, image, instruction, reply)
        except Exception as exc:  # e.g. Qwen-VL's resize refuses aspect ratios above 200
            reason = f"the processor cannot take this page image ({image.width}x{image.height}): {type(exc).__name__}: {exc}"
            skipped.append(where | {"reason": reason[:300]})
            continue
        if reply_tokens > settings.max_output_tokens:
            skipped.append(where | {"reason": f"reply of {reply_tokens} tokens > page_sft.max_output_tokens"})
            continue
        if total > settings.max_length:
            skipped.append(where | {"reason": f"{total} tokens with the image > page_sft.max_length"})
            continue
        records.append(
            {
                "prompt": [{"role": "user", "content": instruction}],
                "completion": [{"role": "assistant", "content": reply}],
                "images": [image],
                "tokens": total,
            }
        )
    return records


def save_records(records: list[dict], folder: Path) -> None:
    from datasets import Dataset, Image, Sequence

    data = Dataset.from_dict({key: [r[key] for r in records] for key in ("prompt", "completion", "images")})
    data.cast_column("images", Sequence(Image())).save_to_disk(str(folder))


def prepare(config: RunConfig, dataset_dir: Path):
    settings = config.page_sft
    train_path = train_file(dataset_dir, "pages")
    schema, instruction = read_page_dataset(dataset_dir)

    def prepare_data(processor, data_dir: Path) -> dict:
        skipped: list[dict] = []
        train = page_records(processor, dataset_dir, train_path, settings, schema, instruction, skipped)
        if not train:
            reasons = sorted({s["reason"] for s in skipped})
            raise TrainingError(f"pages dataset {train_path}: no usable training page ({len(skipped)} skipped: {reasons[:3]})")
        save_records(train, data_dir / "train")
        summary = {"train_pages": len(train)}
        validation_path = dataset_dir / VALIDATION_FILE
        if validation_path.is_file():
            validation = page_records(processor, dataset_dir, validation_path, settings, schema, instruction, skipped)
            if validation:
                save_records(validation, data_dir / "eval")
            summary["validation_pages"] = len(validation)
        lengths = sorted(r["tokens"] for r in train)
        return summary | {
            "train_tokens": sum(lengths),
            "median_length": lengths[len(lengths) // 2],
            "max_length": lengths[-1],
            "skipped_records": len(skipped),
            "skipped": skipped[:100],
        }

    return prepare_data


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    dataset_dir = tracker.fetch(inputs["pages"])
    tracker.log_dataset_input(inputs["pages"], dataset_dir / TRAIN_FILE, context="page_sft")
    extra = {name: (dataset_dir / name).read_text() for name in (PAGE_SCHEMA_FILE, PAGE_INSTRUCTION_FILE)}
    return train_stage("page_sft", config, inputs, tracker, prepare(config, dataset_dir), extra_files=extra)
