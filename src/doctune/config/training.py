"""The training stages: CPT (continued pre-training), SFT and DPO, with what they share.

Each training section also takes any further argument of the TRL (or transformers) config class its trainer
builds, by that class's own name: `sft.eval_accumulation_steps: 4` reaches `trl.SFTConfig(eval_accumulation_steps=4)`.
Arguments doctune sets itself from its own keys are refused with the key to set instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from doctune.config.base import Section

# The config class each stage's trainer is built with (doctune.train.recipes), as "module.Class".
TRL_ARGUMENT_CLASSES = {
    "cpt": "transformers.TrainingArguments",
    "sft": "trl.SFTConfig",
    "dpo": "trl.DPOConfig",
    "page_sft": "trl.SFTConfig",
}

# Arguments doctune derives from its own keys (doctune.train.core.training_arguments and the recipes): the key
# named here (in the same section unless dotted) is what to set instead.
OWN_KEYS = {
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "batch_size",
    "warmup_steps": "warmup_ratio",
    "bf16": "precision",
    "fp16": "precision",
    "save_strategy": "save_steps",
    "data_seed": "seed",
    "packing_strategy": "packing",
    "padding_free": "packing",
    "precompute_ref_log_probs": "reference",
    "output_dir": "project.workdir",
}
# Arguments doctune fixes for reasons of its own: why.
FIXED_ARGUMENTS = {
    "use_cpu": "chosen from the hardware (a GPU when one is visible)",
    "eval_strategy": "SFT and DPO evaluate every eval_steps; CPT measures held-out perplexity before and after",
    "load_best_model_at_end": "SFT keeps the checkpoint with the best eval_loss; CPT and DPO keep the last",
    "metric_for_best_model": "SFT keeps the checkpoint with the best eval_loss; CPT and DPO keep the last",
    "greater_is_better": "SFT keeps the checkpoint with the best eval_loss; CPT and DPO keep the last",
    "include_num_input_tokens_seen": "doctune's tokens-per-second metrics count the input tokens",
    "resume_from_checkpoint": "doctune resumes from the newest checkpoint of the same stage inputs itself",
}
# Arguments doctune gives a value of its own that a run config may replace (doctune.train.core.training_arguments).
OVERRIDABLE_ARGUMENTS = (
    "optim", "report_to", "logging_first_step", "disable_tqdm", "dataloader_num_workers", "dataset_num_proc",
)  # fmt: skip


@functools.cache
def trl_argument_names(stage: str) -> frozenset[str]:
    """The init fields of the stage's TRL/transformers config class (imports it: seconds, only when needed)."""
    module, _, name = TRL_ARGUMENT_CLASSES[stage].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_"))


class LoraSettings(Section):
    """The LoRA adapter (methods lora and qlora)."""

    r: int = Field(16, ge=1, le=1024, description="adapter rank")
    alpha: int = Field(32, ge=1, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="all-linear: every linear layer but the output head; or module-name suffixes, e.g. [q_proj, v_proj]",
    )


class DeepSpeedSettings(Section):
    """ZeRO-3 for `full` fine-tunes over more than one process; the JSON config is generated from these."""

    offload_optimizer: bool = Field(False, description="ZeRO-3 optimizer state in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3 parameters in CPU memory")


class TrainingConfig(Section):
    """What every training stage shares; the CPT, SFT and DPO sections extend it.

    Any further key is an argument of the stage's TRL/transformers config class, passed on by its own name."""

    model_config = ConfigDict(extra="allow")
    stage: ClassVar[str] = "cpt"  # whose TRL config class takes the further arguments

    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora, qlora (bitsandbytes NF4, double quant) or full (all weights)"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="the adapter of methods lora and qlora")
    learning_rate: float | None = Field(
        None, gt=0,
        description="null: the stage's default for the method: CPT 1e-4 (adapter) / 5e-5 (full), SFT 2e-4 / 2e-5, "
        "DPO 5e-6 / 5e-7",
    )  # fmt: skip
    epochs: float = Field(1.0, gt=0, description="passes over the training data (when max_steps is 0)")
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 = as many as the epochs take")
    batch_size: int = Field(4, ge=1, description="sequences (packed rows) per device per step")
    gradient_accumulation_steps: int = Field(4, ge=1, description="micro-batches summed into one optimizer step")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps the learning rate warms up over")
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after the warmup"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this norm")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 where the GPU supports it, else fp16 on GPU; on CPU bf16 autocast for LoRA with AMX, else fp32",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="fused RMSNorm, SwiGLU and RoPE (liger-kernel) for text models: auto = on a CUDA GPU when "
        "liger-kernel is installed (the CUDA image, extra gpu); liger = required; none = PyTorch's own",
    )
    save_steps: int = Field(100, ge=1, description="checkpoint every N optimizer steps (a restarted stage resumes)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best one is kept besides)")
    logging_steps: int = Field(10, ge=1, description="loss, learning rate and throughput logged every N steps")
    processes: int = Field(
        0, ge=0, le=64,
        description="training processes: 0 = one per visible GPU (one on CPU); more: DDP, or DeepSpeed ZeRO-3 for full",
    )  # fmt: skip
    nodes: int = Field(
        1, ge=1, le=512,
        description="more than one: method full on a cluster; a Kubeflow training job runs `processes` ranks per node",
    )  # fmt: skip
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="ZeRO-3 (full, several processes)")
    seed: int = Field(42, description="seed of initialisation, data order and dropout")

    @model_validator(mode="after")
    def _nodes_need_full(self) -> TrainingConfig:
        if self.nodes > 1 and self.method != "full":
            raise ValueError(f"nodes ({self.nodes}) > 1 needs method full (ZeRO-3), not {self.method}")
        return self

    @model_validator(mode="after")
    def _trl_arguments(self) -> TrainingConfig:
        problems = [(key, reason) for key in self.model_extra or {} if (reason := self._refusal(key))]
        if problems:
            raise PydanticCustomError(
                "trl_argument", "{summary}", {"problems": problems, "summary": "; ".join(f"{k}: {r}" for k, r in problems)}
            )
        return self

    @classmethod
    def _refusal(cls, key: str) -> str | None:
        """Why a further key cannot be passed to the trainer, or None when it can."""
        own = OWN_KEYS.get(key)
        if own is not None and ("." in own or own in cls.model_fields):  # DPO has no packing, so padding_free is free
            return f"doctune sets {key} from {own if '.' in own else f'{cls.stage}.{own}'}; set that instead"
        if key in FIXED_ARGUMENTS:
            return f"doctune sets {key} itself: {FIXED_ARGUMENTS[key]}"
        names = trl_argument_names(cls.stage)
        if key in names:
            return None
        close = difflib.get_close_matches(key, sorted(set(cls.model_fields) | names), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return (
            f"unknown key; {hint}allowed keys: {', '.join(cls.model_fields)}, or any field of {TRL_ARGUMENT_CLASSES[cls.stage]}"
        )


class RopeScalingSettings(Section):
    """RoPE scaling for long-document CPT: the context grows by `factor`."""

    type: Literal["none", "linear", "dynamic", "yarn"] = Field("none", description="none, linear, dynamic or yarn")
    factor: float = Field(1.0, ge=1.0, description="context multiplier; max_position_embeddings grows by it")


class CptConfig(TrainingConfig):
    """Continued pre-training on the documents' text (packed blocks), with replay text against forgetting."""

    stage: ClassVar[str] = "cpt"

    enabled: bool = Field(True, description="off: SFT starts from model.base_model")
    block_size: int = Field(2048, ge=16, description="tokens per packed training block (documents joined with EOS)")
    max_eval_blocks: int = Field(128, ge=1, description="held-out blocks scored before and after training")
    rope_scaling: RopeScalingSettings = Field(default_factory=RopeScalingSettings, description="long-document CPT")


class SftConfig(TrainingConfig):
    """Supervised fine-tuning on the synthesized chats (TRL's SFTTrainer), the best evaluated checkpoint kept."""

    stage: ClassVar[str] = "sft"

    max_length: int = Field(1024, ge=16, description="tokens per example; longer prompts are cut from the front")
    packing: bool = Field(True, description="pack examples into max_length rows without cross-example attention")
    eval_steps: int = Field(100, ge=1, description="evaluate on the validation split every N steps")
    max_eval_examples: int = Field(256, ge=1, description="validation examples scored at each evaluation")

    @model_validator(mode="after")
    def _save_on_eval_steps(self) -> SftConfig:
        if self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}): "
                "the best checkpoint is chosen among evaluated ones"
            )
        return self


class DpoConfig(TrainingConfig):
    """Direct preference optimisation on the synthesized pairs (TRL's DPOTrainer)."""

    stage: ClassVar[str] = "dpo"

    enabled: bool = Field(True, description="off: merge takes the SFT model")
    batch_size: int = Field(2, ge=1, description="preference pairs per device per step (each is two sequences)")
    gradient_accumulation_steps: int = Field(8, ge=1, description="micro-batches summed into one optimizer step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps the learning rate warms up over")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference policy")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field("sigmoid", description="sigmoid (DPO), ipo, hinge or robust")
    chosen_nll_weight: float = Field(
        0.0,
        ge=0,
        description="weight of a negative log-likelihood term on the chosen replies (RPO; TRL's `sft` loss beside "
        "`loss_type`): preference loss alone may lower the chosen replies' likelihood, end of turn included, as "
        "long as it lowers the rejected ones' more; 0 is plain DPO",
    )
    reference: Literal["copy", "precomputed"] = Field(
        "copy",
        description="method full only: a frozen reference copy in memory, or its log-probs computed once before "
        "training; lora/qlora score the reference with the adapter disabled",
    )
    max_length: int = Field(1024, ge=16, description="tokens of prompt + reply; longer prompts are cut in the middle")
    eval_steps: int = Field(100, ge=1, description="reward accuracy on the validation pairs every N steps")
    max_eval_pairs: int = Field(128, ge=1, description="validation pairs scored at each evaluation")


TRAINING_SECTIONS: dict[str, type[TrainingConfig]] = {"cpt": CptConfig, "sft": SftConfig, "dpo": DpoConfig}


def training_section(stage: str) -> type[TrainingConfig]:
    """The config class of a training stage, the page track's included."""
    if stage == "page_sft":
        from doctune.config.pages import PageSftConfig

        return PageSftConfig
    return TRAINING_SECTIONS[stage]


def trl_arguments(stage: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The further TRL/transformers arguments in a training section's settings (its model_dump), by TRL name."""
    fields = training_section(stage).model_fields
    return {key: value for key, value in settings.items() if key not in fields}
