"""Run one training job, the same in this process, under torchrun on several GPUs, or with DeepSpeed ZeRO-3.

A stage prepares its tokenized datasets and a `TrainJob`, then calls `launch`: one process trains in-process;
more than one runs `python -m torch.distributed.run ... -m doctune.train.worker job.json`. Either way
`run_job` loads the model for the method (LoRA, QLoRA, full), resumes from the newest checkpoint in
`checkpoint_dir` when there is one (a restarted, preempted stage goes on from there), trains, and writes the
result into `output_dir`: the adapter or the full model with the tokenizer, plus `train_result.json`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from doctune.train import recipes
from doctune.train.core import (
    BEFORE_METRICS,
    DEEPSPEED_CONFIG_ENV,
    RESULT_FILE,
    TrainingError,
    TrainJob,
    adapter_inputs_in_compute_dtype,
    apply_fused_kernels,
    deepspeed_config,
    load_model,
    mlflow_callback,
    peak_memory_mb,
    precision,
)

# -- the job -------------------------------------------------------------------


def last_checkpoint(folder: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if Path(folder).is_dir() else None


def run_job(job: TrainJob, callbacks: list | None = None) -> dict:
    """Train in this process (one rank of a distributed job, or the only one); returns the result summary."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, set_seed

    set_seed(job.settings["seed"])
    prec = precision(job.settings["precision"], job.settings["method"])
    if job.extra.get("vision"):  # the processor (image processor + tokenizer) travels where the tokenizer does
        from doctune.vision import load_processor

        tokenizer = load_processor(job.tokenizer_dir)
        model, peft_config = load_model(job, prec, len(tokenizer.tokenizer))
        kernels = "none"
    else:
        tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
        model, peft_config = load_model(job, prec, len(tokenizer))
        kernels = apply_fused_kernels(model, job.settings["kernels"])
    data = Path(job.data_dir)
    train = load_from_disk(str(data / "train"))
    evaluation = load_from_disk(str(data / "eval")) if (data / "eval").is_dir() else None
    trainer = recipes.TRAINERS[job.stage](job, prec, model, peft_config, tokenizer, train, evaluation)
    if prec in ("bf16", "fp16"):  # the trainer runs the model under autocast
        adapter_inputs_in_compute_dtype(trainer.model)
    for callback in [mlflow_callback(job), *(callbacks or [])]:
        if callback is not None:
            trainer.add_callback(callback)

    resume = last_checkpoint(job.checkpoint_dir)
    before_file = Path(job.checkpoint_dir) / "before.json"
    before = {}
    if evaluation is not None and job.stage in BEFORE_METRICS:
        # The input model on held-out data (CPT loss, DPO reward accuracy), measured once and kept across restarts.
        if before_file.is_file():
            before = json.loads(before_file.read_text())
        else:
            before = {k: float(v) for k, v in trainer.evaluate().items() if k in BEFORE_METRICS[job.stage]}
            if trainer.is_world_process_zero():
                before_file.parent.mkdir(parents=True, exist_ok=True)
                before_file.write_text(json.dumps(before))
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - started
    after = {}
    if evaluation is not None:
        # SFT evaluated every eval_steps and kept its best checkpoint; CPT and DPO measure again on held-out data.
        best = trainer.state.best_metric if job.stage == "sft" else None
        keys = BEFORE_METRICS.get(job.stage, ("eval_loss",))
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if best is not None:
            after = {"eval_loss": float(best)}
        elif last is not None and last.get("step") == trainer.state.global_step:  # evaluated at the last step already
            after = {k: float(v) for k, v in last.items() if k in keys}
        else:
            after = {k: float(v) for k, v in trainer.evaluate().items() if k in keys}

    result = {
        "global_step": trainer.state.global_step,
        "resumed_from_step": int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0,
        "train_loss": float(output.training_loss),
        "train_seconds": seconds,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "precision": prec,
        "kernels": kernels,
        "processes": job.processes,
        "peak_memory_mb": peak_memory_mb(),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "padding_fraction": trainer.counting_collator.padding_fraction,
    }
    result |= {f"{name}_before": value for name, value in before.items()}
    result |= {f"{name}_after": value for name, value in after.items()}
    trainer.save_model(job.output_dir)  # ZeRO-3 gathers the consolidated weights on every rank, rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(job.output_dir)
        (Path(job.output_dir) / "training_args.json").write_text(trainer.args.to_json_string())
        (Path(job.output_dir) / RESULT_FILE).write_text(json.dumps(result, indent=1))
    _end_process_group()
    return result


def _end_process_group() -> None:
    """A rank that exits with its gloo/NCCL process group alive can abort in teardown ("terminate called without an
    active exception") after a finished job: every rank waits for the others, then the group is destroyed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(job: TrainJob, workdir: Path) -> dict:
    """Run the job in-process, across `job.processes` ranks with torchrun, or on `job.nodes` nodes as a Kubeflow
    training job; returns the result summary."""
    if job.nodes > 1:
        return _launch_nodes(job, workdir)
    if job.processes <= 1:
        return run_job(job)
    spec = job.save(Path(workdir) / "job.json")
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={job.processes}",
        f"--master_port={_free_port()}", "-m", "doctune.train.worker", str(spec),
    ]  # fmt: skip
    log = Path(workdir) / "torchrun.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    result_file = Path(job.output_dir) / RESULT_FILE
    if code != 0 or not result_file.is_file():
        tail = log.read_text()[-3000:]
        raise TrainingError(f"{job.processes}-process training exited with {code}; last output:\n{tail}")
    return json.loads(result_file.read_text())


def _launch_nodes(job: TrainJob, workdir: Path) -> dict:
    """`job.nodes` x `job.processes` ranks of ZeRO-3 in a training job; `workdir` must be on the shared cache volume."""
    from doctune.cluster.training_job import DEEPSPEED_FILE, DEEPSPEED_MOUNT, job_name, run_training_job

    spec = job.save(Path(workdir) / "job.json")
    command = ["python", "-m", "torch.distributed.run", "-m", "doctune.train.worker", str(spec)]
    name = job_name(job.stage, job.run_id or Path(workdir).name)
    run_training_job(
        name,
        job.cluster,
        command,
        nodes=job.nodes,
        gpus_per_node=job.processes,
        deepspeed_config=deepspeed_config(job.settings, precision(job.settings["precision"], job.settings["method"])),
        env={DEEPSPEED_CONFIG_ENV: f"{DEEPSPEED_MOUNT}/{DEEPSPEED_FILE}"},
    )
    result_file = Path(job.output_dir) / RESULT_FILE
    if not result_file.is_file():
        raise TrainingError(f"training job {name} succeeded but wrote no {result_file} (is {workdir} on the shared volume?)")
    return json.loads(result_file.read_text())
