"""CPT: causal LM on the domain text (plus replay), packed into fixed blocks; perplexity on the held-out domain text
(the `heldout` artifact synth wrote, which no training stage sees) before and after."""

from __future__ import annotations

from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.records import HELDOUT_FILE, TRAIN_FILE, text_records
from doctune.textblocks import pack
from doctune.tracking import StageRun
from doctune.train.core import TrainingError
from doctune.train.stage import save_split, train_file, train_stage


def prepare(config: RunConfig, dataset_dir: Path, heldout_dir: Path | None):
    cfg = config.cpt
    path = train_file(dataset_dir, "CPT")

    def prepare_data(tokenizer, data_dir: Path) -> dict:
        skipped: list[dict] = []
        records = text_records(path, skipped)
        if not records:
            raise TrainingError(f"CPT dataset {path}: no usable text records ({len(skipped)} skipped: {skipped[:3]})")
        evaluation: list[str] = []
        if heldout_dir is not None and (heldout_dir / HELDOUT_FILE).is_file():
            evaluation = [r["text"] for r in text_records(heldout_dir / HELDOUT_FILE, skipped)]
        train_blocks, dropped = pack([r["text"] for r in records], tokenizer, cfg.block_size)
        if not train_blocks:
            raise TrainingError(
                f"CPT dataset {path}: {dropped} tokens make no full block of block_size {cfg.block_size}; lower cpt.block_size"
            )
        save_split(data_dir, "train", train_blocks, train_blocks)
        eval_blocks = pack(evaluation, tokenizer, cfg.block_size)[0][: cfg.max_eval_blocks]
        if eval_blocks:
            save_split(data_dir, "eval", eval_blocks, eval_blocks)
        summary = {
            "records": len(records),
            "replay_records": sum(r["source"] == "replay" for r in records),
            "held_out_records": len(evaluation),
            "train_blocks": len(train_blocks),
            "eval_blocks": len(eval_blocks),
            "train_tokens": len(train_blocks) * cfg.block_size,
            "tokens_dropped_at_end": dropped,
            "skipped_records": len(skipped),
            "skipped": skipped[:100],
        }
        if cfg.rope_scaling.type != "none":
            summary["job_extra"] = {"rope_scaling": cfg.rope_scaling.model_dump()}
        return summary

    return prepare_data


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    dataset_dir = tracker.fetch(inputs["cpt"])
    heldout_dir = tracker.fetch(inputs["heldout"]) if "heldout" in inputs else None
    tracker.log_dataset_input(inputs["cpt"], dataset_dir / TRAIN_FILE, context="cpt")
    return train_stage("cpt", config, inputs, tracker, prepare(config, dataset_dir, heldout_dir))
