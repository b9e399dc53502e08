"""What a training stage does around the training processes: input model, tokenizer, checkpoints, outputs.

`train_stage` materializes the input model (merging an input adapter: no stacking), prepares the tokenizer,
lets the stage tokenize its data, launches the job with a checkpoint folder keyed on everything that shapes
the result (so a restarted stage resumes), then logs the adapter or full model as the `model` output.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from doctune.artifacts import MODEL_KIND, ArtifactRef
from doctune.cache import Cache
from doctune.code_digest import code_digest
from doctune.config import RunConfig, TrainingConfig
from doctune.records import TRAIN_FILE
from doctune.tracking import StageRun
from doctune.train.artifacts import (
    base_of,
    copy_generation_config,
    end_of_turn_generation_config,
    materialize,
    write_meta,
)
from doctune.train.core import (
    RESULT_FILE,
    TrainingError,
    TrainJob,
    check_qlora,
    default_learning_rate,
    fused_kernels,
    process_count,
)
from doctune.train.launch import launch
from doctune.vision import is_vision_model


def prepare_tokenizer(model_dir: Path):
    """Right padding, a pad token (the unknown token where it differs from EOS, else EOS itself).

    Labels are built explicitly with -100 on padding, so a pad token equal to EOS never masks the real EOS.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token is None:
        raise TrainingError(f"the tokenizer of {model_dir} has no EOS token: examples could not end in one")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        distinct_unk = tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id
        tokenizer.pad_token = tokenizer.unk_token if distinct_unk else tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def vision_processor(model_dir: Path):
    """A vision-language model's processor, right-padded like the text tokenizer."""
    from doctune.vision import VisionModelError, load_processor

    try:
        processor = load_processor(model_dir)
    except VisionModelError as exc:
        raise TrainingError(str(exc)) from None
    processor.tokenizer.padding_side = "right"
    return processor


def train_file(dataset_dir: Path, what: str) -> Path:
    path = Path(dataset_dir) / TRAIN_FILE
    if not path.is_file():
        raise TrainingError(f"{what} dataset {Path(dataset_dir).name}: {TRAIN_FILE} is missing")
    return path


def save_split(data_dir: Path, split: str, input_ids: list[list[int]], labels: list[list[int]]) -> None:
    """A tokenized split (`train` or `eval`) where the training processes load it."""
    from datasets import Dataset

    Dataset.from_dict({"input_ids": input_ids, "labels": labels}).save_to_disk(str(Path(data_dir) / split))


def checkpoint_key(stage: str, settings: TrainingConfig, inputs: dict[str, ArtifactRef], config: RunConfig) -> str:
    blob = json.dumps(
        [stage, settings.model_dump(mode="json"), {k: v.digest for k, v in sorted(inputs.items())}, config.model.base_model,
         code_digest(f"doctune.{stage}.stage")],
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _metrics(stage: str, result: dict) -> dict[str, float]:
    out = {
        f"{stage}.final_train_loss": result["train_loss"],
        f"{stage}.global_step": result["global_step"],
        f"{stage}.resumed_from_step": result["resumed_from_step"],
        f"{stage}.train_seconds": result["train_seconds"],
        f"{stage}.padding_fraction": result["padding_fraction"],
        f"{stage}.peak_memory_mb": result["peak_memory_mb"],
    }
    if result["train_seconds"] > 0 and result["tokens_seen"]:
        out[f"{stage}.mean_tokens_per_second"] = result["tokens_seen"] / result["train_seconds"]
    for key, value in result.items():
        if key.startswith("eval_") and key.endswith(("_before", "_after")):
            out[f"{stage}.{key}"] = value
            if key.startswith("eval_loss_"):
                out[f"{stage}.perplexity_{key.rsplit('_', 1)[1]}"] = math.exp(min(value, 50))
    return out


def train_stage(
    stage: str,
    config: RunConfig,
    inputs: dict[str, ArtifactRef],
    tracker: StageRun,
    prepare_data: Callable[[object, Path], dict],
    extra_files: dict[str, str] | None = None,
) -> dict[str, ArtifactRef]:
    """Run one training stage; `prepare_data(tokenizer, data_dir)` writes train/ (and eval/) and returns a summary.

    `extra_files` (name -> text) travel inside the model artifact, e.g. the system prompt serving must reuse.
    """
    settings: TrainingConfig = getattr(config, stage)
    if settings.method == "qlora":
        check_qlora()  # before any model is loaded or data prepared
    if settings.nodes == 1:  # a training job's pods, not this one, hold the GPUs otherwise
        fused_kernels(settings.kernels)  # kernels: liger where it cannot run fails here, before any work
    model_input = inputs.get("model")
    model_dir = materialize(model_input, config, tracker.fetch)
    key = checkpoint_key(stage, settings, inputs, config)
    checkpoints = Cache(config.project.workdir / "cache").entry(f"train/{stage}", key)
    processes = process_count(settings.processes)
    shared = None
    if settings.nodes > 1:  # training-job pods read data and write the model on the shared cache volume
        processes = settings.processes or config.cluster.gpu.count
        shared = config.project.workdir / "jobs"
        shared.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"doctune-{stage}-", dir=shared) as tmp:
        work = Path(tmp)
        vision = is_vision_model(model_dir)
        tokenizer = vision_processor(model_dir) if vision else prepare_tokenizer(model_dir)
        tokenizer.save_pretrained(work / "tokenizer")
        data_summary = prepare_data(tokenizer, work / "data")
        tracker.log_metrics({f"data.{k}": v for k, v in data_summary.items() if isinstance(v, (int, float))})
        tracker.log_text(json.dumps(data_summary, indent=1), f"{stage}_data_report.json")
        job = TrainJob(
            stage=stage,
            settings=settings.model_dump(mode="json"),
            model_dir=str(model_dir),
            tokenizer_dir=str(work / "tokenizer"),
            data_dir=str(work / "data"),
            checkpoint_dir=str(checkpoints),
            output_dir=str(work / "model"),
            learning_rate=settings.learning_rate or default_learning_rate(stage, settings.method, model_dir),
            tracking_uri=tracker.tracker.uri,
            run_id=tracker.run_id,
            processes=processes,
            nodes=settings.nodes,
            cluster=config.cluster.model_dump(mode="json") if settings.nodes > 1 else {},
            extra=data_summary.get("job_extra", {}) | ({"vision": True} if vision else {}),
        )
        tracker.set_tags({f"doctune.{stage}.learning_rate": job.learning_rate, f"doctune.{stage}.processes": processes})
        result = launch(job, work)
        out = work / "model"
        copy_generation_config(model_dir, out)
        end_of_turn_generation_config(out, tokenizer.tokenizer if vision else tokenizer)
        (out / RESULT_FILE).write_text(json.dumps(result, indent=1))
        for name, text in (extra_files or {}).items():
            (out / name).write_text(text)
        write_meta(
            out,
            fmt="full" if settings.method == "full" else "adapter",
            stage=stage,
            method=settings.method,
            base=base_of(model_input, config),
            extra={
                "datasets": {k: v.digest for k, v in inputs.items() if k != "model"},
                "stage_run": tracker.run_id,
                **job.extra,  # e.g. rope_scaling, which a merge must apply to the base config
            },
        )
        tracker.log_metrics(_metrics(stage, result))
        outputs = {"model": tracker.log_output("model", out, kind=MODEL_KIND)}
    shutil.rmtree(checkpoints, ignore_errors=True)  # the result is in MLflow now; a rerun needs no resume
    return outputs
