"""One training job, the same in this process, under torchrun on several GPUs, or with DeepSpeed ZeRO-3.

A stage prepares its tokenized datasets and a `TrainJob`, then calls `launch`: one process trains in-process;
more than one runs `python -m torch.distributed.run ... -m doctune.train.worker job.json`. Either way
`run_job` loads the model for the method (LoRA, QLoRA, full), resumes from the newest checkpoint in
`checkpoint_dir` when there is one (a restarted, preempted stage goes on from there), trains, and writes the
result into `output_dir`: the adapter or the full model with the tokenizer, plus `train_result.json`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Default learning rates by (stage, method family): LoRA adapters need larger steps than full weights.
DEFAULT_LEARNING_RATES = {
    ("cpt", "adapter"): 1e-4,
    ("cpt", "full"): 5e-5,
    ("sft", "adapter"): 2e-4,
    ("sft", "full"): 2e-5,
    ("dpo", "adapter"): 5e-6,
    ("dpo", "full"): 5e-7,
}
RESULT_FILE = "train_result.json"
# Evaluation metrics measured before training as well as after, per stage.
BEFORE_METRICS = {"cpt": ("eval_loss",), "dpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")}


class TrainingError(RuntimeError):
    """A training job that cannot start or did not finish; the message names the cause."""


# Set in training-job pods: the mounted ZeRO-3 config file.
DEEPSPEED_CONFIG_ENV = "DOCTUNE_DEEPSPEED_CONFIG"


# Adapters on small models (hidden size up to 1024: SmolLM2-135M/360M, Qwen2.5-0.5B) take larger steps. On the
# bundled 135M model: 16 SFT LoRA steps at 1e-3 end at held-out loss 2.49 where 2e-4 ends at 2.96; 8 DPO LoRA
# steps at 5e-4 take the validation loss from 0.693 to 0.621 (reward accuracy 0.75), where 5e-5 reaches 0.692.
SMALL_MODEL_HIDDEN_SIZE = 1024
SMALL_MODEL_LEARNING_RATES = {("sft", "adapter"): 1e-3, ("dpo", "adapter"): 5e-4}


def default_learning_rate(stage: str, method: str, model_dir: str | Path | None = None) -> float:
    key = (stage, "full" if method == "full" else "adapter")
    if key in SMALL_MODEL_LEARNING_RATES and model_dir is not None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
        if hidden and hidden <= SMALL_MODEL_HIDDEN_SIZE:
            return SMALL_MODEL_LEARNING_RATES[key]
    return DEFAULT_LEARNING_RATES[key]


@dataclass
class TrainJob:
    """Everything a training process needs, as JSON (it crosses into torchrun workers)."""

    stage: str  # "cpt" or "sft": picks the trainer
    settings: dict  # the stage's config section, as model_dump(mode="json")
    model_dir: str  # full-precision input weights
    tokenizer_dir: str  # the prepared tokenizer the datasets were tokenized with
    data_dir: str  # datasets saved with save_to_disk: train/ and, when present, eval/
    checkpoint_dir: str
    output_dir: str
    learning_rate: float
    tracking_uri: str = ""
    run_id: str = ""  # MLflow stage run that receives metrics (rank 0 only)
    processes: int = 1  # per node
    nodes: int = 1  # more than one: a Kubeflow training job (doctune.cluster.training_job)
    cluster: dict = field(default_factory=dict)  # the run config's cluster section, for nodes > 1
    extra: dict = field(default_factory=dict)  # stage-specific values (e.g. CPT's RoPE settings)

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        return cls(**json.loads(Path(path).read_text()))


# -- devices and methods -----------------------------------------------------


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_count(requested: int) -> int:
    return requested or max(1, visible_gpus())


def precision(requested: str, method: str) -> str:
    """fp32, bf16 or fp16: `auto` picks bf16 where the GPU supports it, fp16 on other GPUs; on a CPU, bf16
    autocast for LoRA where AMX multiplies bf16 in hardware (1.36x the tokens/s of fp32 on the 2-core SFT, the
    trained adapter stays fp32), fp32 otherwise."""
    import torch

    from doctune.runtimes import hardware_bf16

    if requested == "fp16" and not torch.cuda.is_available():
        raise TrainingError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "bf16" if method == "lora" and hardware_bf16() else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_qlora() -> None:
    """QLoRA needs bitsandbytes' 4-bit kernels on this device: try one before any training starts."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # ImportError, missing native library, unsupported device
        raise TrainingError(
            f"method qlora needs bitsandbytes 4-bit (NF4) kernels on {device}, which are not available here "
            f"({type(exc).__name__}: {exc}); use method lora or full"
        ) from exc


def lora_targets(model, targets) -> list[str] | str:
    """Resolve configured LoRA targets against the model; a target that matches nothing is an error."""
    import torch

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if targets == "all-linear":
        return "all-linear"
    missing = [t for t in targets if t not in linear]
    if missing:
        raise TrainingError(f"LoRA target modules {missing} match no linear layer of the model; its linear layers: {linear}")
    return list(targets)


def load_model(job: TrainJob, prec: str, vocab_size: int):
    """(model, LoRA config or None) per method. The trainer recipe attaches the fresh adapter: DPO lets TRL do
    it, so that its reference policy is this same model with the adapter disabled."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = job.settings
    method = settings["method"]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    kwargs: dict = {"dtype": dtype if method == "full" else torch.float32 if prec == "fp32" else dtype}
    if method == "qlora":
        check_qlora()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if prec == "bf16" else torch.float32,
        )  # fmt: skip
    if rope := job.extra.get("rope_scaling"):
        kwargs["config"] = scaled_rope_config(job.model_dir, **rope)
    model = AutoModelForCausalLM.from_pretrained(job.model_dir, **kwargs)
    if vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    if settings["gradient_checkpointing"]:
        model.config.use_cache = False
    if method == "full":
        return model, None
    from peft import LoraConfig, prepare_model_for_kbit_training

    targets = lora_targets(model, settings["lora"]["target_modules"])
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    lora = settings["lora"]
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
        task_type="CAUSAL_LM", bias="none",
    )  # fmt: skip
    return model, peft_config


def scaled_rope_config(model_dir: str, type: str, factor: float):
    """The model config with RoPE scaling (linear, dynamic, yarn) and max_position_embeddings grown by `factor`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    original = config.max_position_embeddings
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"rope_type": type, "factor": float(factor), "original_max_position_embeddings": original})
    config.rope_parameters = params
    config.max_position_embeddings = int(original * factor)
    return config


def deepspeed_config(settings: dict, prec: str) -> dict:
    """ZeRO-3 for full fine-tunes across processes; 'auto' values are filled in from the training arguments."""
    ds = settings["deepspeed"]
    zero: dict = {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
        "stage3_param_persistence_threshold": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "reduce_bucket_size": "auto",
    }
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
    }


def training_arguments(job: TrainJob, prec: str, args_class, **extra):
    """TrainingArguments (or a TRL config class) from the stage settings: schedule, checkpoints, precision."""
    import torch

    s = job.settings
    use_deepspeed = s["method"] == "full" and (job.processes > 1 or job.nodes > 1)
    if use_deepspeed and job.nodes > 1:  # the ZeRO-3 ConfigMap the training job mounts
        ds: dict | str = os.environ[DEEPSPEED_CONFIG_ENV]
    elif use_deepspeed:
        ds = deepspeed_config(s, prec)
    optim = "paged_adamw_8bit" if s["method"] == "qlora" and torch.cuda.is_available() else "adamw_torch"
    return args_class(
        output_dir=job.checkpoint_dir,
        learning_rate=job.learning_rate,
        num_train_epochs=s["epochs"],
        max_steps=s["max_steps"] or -1,
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        warmup_steps=s["warmup_ratio"],  # a float below 1 is a share of the total steps
        lr_scheduler_type=s["lr_scheduler"],
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        gradient_checkpointing=s["gradient_checkpointing"],
        save_strategy="steps",
        save_steps=s["save_steps"],
        save_total_limit=s["save_total_limit"],
        logging_steps=s["logging_steps"],
        logging_first_step=True,
        seed=s["seed"],
        data_seed=s["seed"],
        optim=optim,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=ds if use_deepspeed else None,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


# -- metrics -------------------------------------------------------------------


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mlflow_callback(job: TrainJob):
    """Trainer callback logging loss, learning rate, grad norm, tokens/s and peak memory to the stage run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        def __init__(self):
            self.client = MlflowClient(job.tracking_uri) if job.run_id else None
            self.last = (time.monotonic(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.client is None or not logs:
                return
            now = int(time.time() * 1000)
            prefix = f"{job.stage}."
            values = {prefix + k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            seen = state.num_input_tokens_seen or 0
            clock, tokens = self.last
            if seen > tokens and time.monotonic() > clock:
                values[prefix + "tokens_per_second"] = (seen - tokens) / (time.monotonic() - clock)
                self.last = (time.monotonic(), seen)
            values[prefix + "peak_memory_mb"] = peak_memory_mb()
            metrics = [Metric(k, v, now, state.global_step) for k, v in values.items()]
            self.client.log_batch(job.run_id, metrics=metrics)

    return MlflowMetrics()


# -- the job -------------------------------------------------------------------


def last_checkpoint(folder: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if Path(folder).is_dir() else None


def run_job(job: TrainJob, callbacks: list | None = None) -> dict:
    """Train in this process (one rank of a distributed job, or the only one); returns the result summary."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, set_seed

    from doctune.train import recipes

    set_seed(job.settings["seed"])
    prec = precision(job.settings["precision"], job.settings["method"])
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    model, peft_config = load_model(job, prec, len(tokenizer))
    data = Path(job.data_dir)
    train = load_from_disk(str(data / "train"))
    evaluation = load_from_disk(str(data / "eval")) if (data / "eval").is_dir() else None
    trainer = recipes.TRAINERS[job.stage](job, prec, model, peft_config, tokenizer, train, evaluation)
    for callback in [mlflow_callback(job), *(callbacks or [])]:
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
    return result


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
