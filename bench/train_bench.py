"""Training benchmark: SFT tokens/s with packing against without, on the same data and model in one run; CPT tokens/s.

Uses the synthetic SFT and CPT datasets of the corpus (ingest and synth run first, or are reused from an
earlier run under .doctune) and the bundled SmolLM2-135M-Instruct with LoRA. Tokens/s counts real tokens
(padding excluded), so the packed/unpacked ratio is the useful work per second.
Writes bench/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from results_io import write_results

from doctune.config import load_config
from doctune.cpt.stage import prepare as prepare_cpt
from doctune.sft.stage import prepare as prepare_sft
from doctune.stages import execute_stage
from doctune.tracking import Tracker
from doctune.train.core import TrainJob, default_learning_rate
from doctune.train.launch import run_job
from doctune.train.stage import prepare_tokenizer

REPO = Path(__file__).resolve().parents[1]


def datasets(config) -> tuple[Tracker, dict]:
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("bench-train")
    ingested = execute_stage("ingest", config, tracker, parent, {})
    data = execute_stage("synth", config, tracker, parent, {k: ingested.outputs[k] for k in ("chunks", "pages")})
    tracker.close_pipeline_run(parent, succeeded=True)
    return tracker, data.outputs


def measure(stage: str, config, model_dir: Path, dataset_dir: Path, steps: int) -> dict:
    settings = getattr(config, stage)
    prepare = {"cpt": prepare_cpt, "sft": prepare_sft}[stage](config, dataset_dir)
    with tempfile.TemporaryDirectory(prefix=f"bench-{stage}-") as tmp:
        work = Path(tmp)
        tokenizer = prepare_tokenizer(model_dir)
        tokenizer.save_pretrained(work / "tokenizer")
        prepare(tokenizer, work / "data")
        if (work / "data" / "eval").is_dir():  # throughput only: no evaluation passes
            import shutil

            shutil.rmtree(work / "data" / "eval")
        job = TrainJob(
            stage=stage, settings=settings.model_dump(mode="json") | {"max_steps": steps, "save_steps": 10**6},
            model_dir=str(model_dir), tokenizer_dir=str(work / "tokenizer"), data_dir=str(work / "data"),
            checkpoint_dir=str(work / "checkpoints"), output_dir=str(work / "out"),
            learning_rate=default_learning_rate(stage, settings.method),
        )  # fmt: skip
        result = run_job(job)
    return {
        "steps": result["global_step"],
        "tokens": result["tokens_seen"],
        "seconds": round(result["train_seconds"], 2),
        "tokens_per_second": round(result["tokens_seen"] / result["train_seconds"], 1),
        "padding_fraction": round(result["padding_fraction"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measured run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = load_config(REPO / "configs" / "cpu-demo.yaml", [f"project.workdir={REPO / '.doctune'}", f"ingest.pdfs={args.pdfs}"])
    tracker, outputs = datasets(config)
    from doctune.models import resolve_model

    model_dir = resolve_model(config.model.base_model, config.project.workdir / "cache")
    sft_dir, cpt_dir = tracker.fetch(outputs["sft"]), tracker.fetch(outputs["cpt"])
    packed = measure("sft", config, model_dir, sft_dir, args.steps)
    unpacked = measure("sft", config.model_copy(update={"sft": config.sft.model_copy(update={"packing": False})}), model_dir,
                       sft_dir, args.steps)  # fmt: skip
    cpt = measure("cpt", config, model_dir, cpt_dir, args.steps)
    ratio = packed["tokens_per_second"] / unpacked["tokens_per_second"]
    result = {
        "model": config.model.base_model,
        "method": config.sft.method,
        "batch_size": config.sft.batch_size,
        "sft_max_length": config.sft.max_length,
        "cpt_block_size": config.cpt.block_size,
        "sft_packed": packed,
        "sft_unpacked": unpacked,
        "packed_over_unpacked": round(ratio, 2),
        "targets": {"packed_over_unpacked": ">= 2", "packed_padding_fraction": "< 0.05"},
        "cpt": cpt,
        "cpus": os.cpu_count(),
    }
    lines = [
        f"Training benchmark: bundled SmolLM2-135M-Instruct, LoRA, batch {config.sft.batch_size}, {args.steps} steps per "
        f"run, synthetic data of ../shared/corpus, {os.cpu_count()} CPUs.",
        "",
        "| run | tokens/s (real tokens) | padding | tokens | seconds |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {r['tokens_per_second']} | {r['padding_fraction']:.1%} | {r['tokens']} | {r['seconds']} |"
            for name, r in (("SFT packed", packed), ("SFT unpacked", unpacked), ("CPT blocks", cpt))
        ),
        "",
        f"SFT packed / unpacked: **{ratio:.2f}x** (target >= 2x); packed padding {packed['padding_fraction']:.1%} (target < 5%).",
    ]
    write_results(args.out, "train", result, lines)


if __name__ == "__main__":
    main()
