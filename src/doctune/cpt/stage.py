"""CPT: causal LM on the domain text (plus replay), packed into fixed blocks; held-out domain perplexity before/after."""

from __future__ import annotations

import hashlib
from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.tracking import StageRun
from doctune.train.core import TrainingError
from doctune.train.stage import read_jsonl, save_split, train_file, train_stage


def held_out(text: str, seed: int, fraction: float) -> bool:
    """Stable assignment of a domain text to the perplexity hold-out."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def pack(texts: list[str], tokenizer, block_size: int) -> tuple[list[list[int]], int]:
    """Texts joined with EOS, cut into full blocks of block_size tokens; returns (blocks, tokens dropped at the end)."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    full = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(full)], len(stream) - full * block_size


def load_texts(path: Path) -> tuple[list[dict], list[dict]]:
    skipped: list[dict] = []
    records = []
    for record in read_jsonl(path, skipped):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            skipped.append({"file": path.name, "line": record["_line"], "reason": "field 'text' is missing or empty"})
            continue
        records.append({"text": text, "source": record.get("source", "domain")})
    return records, skipped


def domain_texts(config: RunConfig, cpt_dir: Path) -> tuple[list[str], list[str]]:
    """(the domain texts CPT holds out with its seed and fraction, all domain texts) of a CPT dataset."""
    records, _ = load_texts(train_file(cpt_dir, "CPT"))
    domain = [r["text"] for r in records if r["source"] == "domain"]
    return [t for t in domain if held_out(t, config.cpt.seed, config.cpt.eval_fraction)], domain


def held_out_blocks(config: RunConfig, cpt_dir: Path, tokenizer, block_size: int, count: int) -> list[list[int]]:
    """CPT's held-out domain text in blocks, for perplexity after training (quantize, gate); all domain text
    when the hold-out fills no block."""
    held, domain = domain_texts(config, cpt_dir)
    blocks = pack(held, tokenizer, block_size)[0] or pack(domain, tokenizer, block_size)[0]
    if not blocks:
        raise TrainingError(f"CPT dataset {cpt_dir}: its domain text makes no block of {block_size} tokens")
    return blocks[:count]


def prepare(config: RunConfig, dataset_dir: Path):
    cfg = config.cpt
    path = train_file(dataset_dir, "CPT")

    def prepare_data(tokenizer, data_dir: Path) -> dict:
        records, skipped = load_texts(path)
        if not records:
            raise TrainingError(f"CPT dataset {path}: no usable text records ({len(skipped)} skipped: {skipped[:3]})")
        evaluation = [r["text"] for r in records if r["source"] == "domain" and held_out(r["text"], cfg.seed, cfg.eval_fraction)]
        held = set(evaluation)
        train = [r["text"] for r in records if r["text"] not in held]
        train_blocks, dropped = pack(train, tokenizer, cfg.block_size)
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
    tracker.log_dataset_input(inputs["cpt"], dataset_dir / "train.jsonl", context="cpt")
    return train_stage("cpt", config, inputs, tracker, prepare(config, dataset_dir))
