"""What one training job is made of: the `TrainJob` description, precision, model loading for the method (LoRA,
QLoRA, full), training arguments, DeepSpeed ZeRO-3 settings, and the MLflow metrics callback. The trainers are in
`recipes`, running a job (in-process, torchrun, a training job on the cluster) in `launch`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
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
    ("page_sft", "adapter"): 2e-4,
    ("page_sft", "full"): 2e-5,
}
# Where a method's rate differs from its family's: the page guide's QLoRA range (1e-4 to 1.5e-4) sits below LoRA's.
METHOD_LEARNING_RATES = {("page_sft", "qlora"): 1.5e-4}
RESULT_FILE = "train_result.json"
# Evaluation metrics measured before training as well as after, per stage.
BEFORE_METRICS = {"cpt": ("eval_loss",), "dpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")}


class TrainingError(RuntimeError):
    """A training job that cannot start or did not finish; the message names the cause."""


# Set in training-job pods: the mounted ZeRO-3 config file.
DEEPSPEED_CONFIG_ENV = "DOCTUNE_DEEPSPEED_CONFIG"


def default_learning_rate(stage: str, method: str, model_dir: str | Path | None = None) -> float:
    """The standard learning rate of a stage and method family (a run config's learning_rate: null).
    `model_dir` is accepted for callers that pass it; the rate does not depend on the model."""
    if (stage, method) in METHOD_LEARNING_RATES:
        return METHOD_LEARNING_RATES[(stage, method)]
    return DEFAULT_LEARNING_RATES[(stage, "full" if method == "full" else "adapter")]


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
    """The training precision: doctune.devices' policy for training (PrecisionError there becomes TrainingError)."""
    from doctune.devices import PrecisionError
    from doctune.devices import precision as policy

    try:
        return policy(requested, "train", method)
    except PrecisionError as exc:
        raise TrainingError(str(exc)) from None


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


def fused_kernels(requested: str) -> str:
    """Which layer kernels training uses: "liger" (liger-kernel's fused RMSNorm, SwiGLU and RoPE) or "none"
    (PyTorch's own). `auto` takes liger where it runs: a CUDA GPU with liger-kernel installed (the CUDA image)."""
    if requested == "none":
        return "none"
    import torch

    missing = None
    if not torch.cuda.is_available():
        missing = "a CUDA GPU (its Triton kernels run on GPUs only)"
    elif importlib.util.find_spec("liger_kernel") is None:
        missing = "the liger-kernel package (pip install 'doctune[gpu]'; the CUDA image has it)"
    if missing is None:
        return "liger"
    if requested == "liger":
        raise TrainingError(f"kernels: liger needs {missing}; set kernels: auto or none")
    return "none"


def apply_fused_kernels(model, requested: str) -> str:
    """The kernels `fused_kernels` picks, put in place: liger-kernel's RMSNorm, SwiGLU and RoPE instead of the
    model's own. Returns what the model runs: "none" where liger has no kernels for its type (an error when asked
    for liger by name).

    The loss stays with the trainers: TRL's fused LM head for SFT and DPO (liger's fused linear cross-entropy would
    replace the forward TRL patches), transformers' for CPT."""
    if fused_kernels(requested) == "none":
        return "none"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if requested == "liger":
            raise TrainingError(f"kernels: liger has no kernels for model type {model_type}; set kernels: auto or none")
        return "none"
    kernels = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    _apply_liger_kernel_to_instance(model=model, **kernels)
    return "liger"


def adapter_inputs_in_compute_dtype(model) -> int:
    """Stop PEFT casting each adapter's input to the adapter's fp32 weights; returns the layers changed.

    Under bf16/fp16 autocast the adapter's matrix products run in the compute dtype whatever the input's dtype, so
    the cast only writes an fp32 copy of every adapted layer's input (and its gradient) that autocast casts straight
    back: the same numbers, more memory traffic. The adapter weights stay fp32 for the optimizer."""
    changed = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", False) and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


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
    if job.extra.get("vision"):
        if method == "qlora":  # the language model only, see doctune.vision.nf4_config
            from doctune.vision import nf4_config

            kwargs["quantization_config"] = nf4_config(kwargs["quantization_config"].bnb_4bit_compute_dtype)
        return load_vision_model(job, kwargs)
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


def load_vision_model(job: TrainJob, kwargs: dict):
    """A vision-language model for page SFT: LoRA on the language model's projections only (the vision encoder
    frozen), the projector optionally trained in full; method full freezes the vision encoder."""
    from doctune import vision

    settings, lora = job.settings, job.settings["lora"]
    try:
        model = vision.load_model(job.model_dir, kwargs["dtype"], kwargs.get("quantization_config"))
    except vision.VisionModelError as exc:
        raise TrainingError(str(exc)) from None
    if settings["gradient_checkpointing"]:
        model.config.use_cache = False
    if settings["method"] == "full":
        vision.freeze_vision_encoder(model, lora["train_projector"])
        return model, None
    from peft import LoraConfig, prepare_model_for_kbit_training

    try:
        targets = vision.language_lora_targets(model, lora["target_modules"], lora["include_mlp"])
        save = [vision.projector_module(model)] if lora["train_projector"] else None
    except vision.VisionModelError as exc:
        raise TrainingError(str(exc)) from None
    if settings["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
        modules_to_save=save, task_type="CAUSAL_LM", bias="none",
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
    """TrainingArguments (or a TRL config class) from the stage settings: schedule, checkpoints, precision; then the
    trainer recipe's own arguments (`extra`), then any further TRL arguments the run config's section names."""
    import torch

    from doctune.config import trl_arguments

    s = job.settings
    use_deepspeed = s["method"] == "full" and (job.processes > 1 or job.nodes > 1)
    if use_deepspeed and job.nodes > 1:  # the ZeRO-3 ConfigMap the training job mounts
        ds: dict | str = os.environ[DEEPSPEED_CONFIG_ENV]
    elif use_deepspeed:
        ds = deepspeed_config(s, prec)
    cuda = torch.cuda.is_available()
    # On a GPU: the fused AdamW kernel (one launch for all tensors), paged 8-bit states for QLoRA's memory budget.
    optim = ("paged_adamw_8bit" if s["method"] == "qlora" else "adamw_torch_fused") if cuda else "adamw_torch"
    arguments = dict(
        output_dir=job.checkpoint_dir,
        learning_rate=job.learning_rate,
        num_train_epochs=s["epochs"],
        max_steps=s["max_steps"] or -1,
        per_device_train_batch_size=s["batch_size"],
        per_device_eval_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        warmup_steps=s["warmup_ratio"],  # a float below 1 is a share of the total steps
        lr_scheduler_type=s["lr_scheduler_type"],
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
        use_cpu=not cuda,
        deepspeed=ds if use_deepspeed else None,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    # The run config refuses the arguments doctune derives from its own keys; the ones it only fixes (optim,
    # report_to, dataloader_num_workers, ...) a run config may set.
    return args_class(**(arguments | extra | trl_arguments(job.stage, s)))


# -- metrics -------------------------------------------------------------------


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mlflow_callback(job: TrainJob):
    """Trainer callback logging loss, learning rate, grad norm, tokens/s and peak memory to the stage run; None for
    a job with no stage run (a benchmark's), which then needs no MLflow."""
    if not job.run_id:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        def __init__(self):
            self.client = MlflowClient(job.tracking_uri)
            self.last = (time.monotonic(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
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
