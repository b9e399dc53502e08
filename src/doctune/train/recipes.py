"""The trainer each stage runs inside a training process: CPT on packed blocks, SFT with TRL's SFTTrainer.

Both take datasets that are already tokenized with `labels` (-100 where no loss applies), so what is
trained on is decided once, by the stage's data preparation, and tested there.
"""

from __future__ import annotations

from doctune.train.core import TrainJob, training_arguments


class CountingCollator:
    """Wraps a collator and counts real and padded positions, for the padding fraction in the result."""

    def __init__(self, inner):
        self.inner = inner
        self.real = 0
        self.total = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        if "attention_mask" in batch and not any(k in examples[0] for k in ("input_ids", "prompt_ids")):
            self.real += int(batch["attention_mask"].sum())  # raw page records: the processor tokenizes in the collator
        else:
            self.real += sum(self.tokens(example) for example in examples)
        self.total += batch["input_ids"].numel()
        return batch

    @staticmethod
    def tokens(example) -> int:
        if "input_ids" in example:
            return len(example["input_ids"])
        # A preference pair becomes two sequences: prompt + chosen and prompt + rejected.
        return 2 * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


class RowPackedCollator:
    """Packed rows kept as rows: position ids restart at each example and no attention mask is passed, so
    transformers builds a block-diagonal causal mask per row (SDPA, eager). Attention costs rows x length^2,
    not the (rows x length)^2 of flattening the batch, which only pays off with FlashAttention's varlen kernels.
    Row padding becomes a sequence of its own: nothing attends to it and its labels are -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        import torch

        width = max(len(example["input_ids"]) for example in examples)
        input_ids, labels, positions = [], [], []
        for example in examples:
            ids = list(example["input_ids"])
            lengths = list(example.get("seq_lengths") or [len(ids)])
            pad = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(list(example["labels"]) + [-100] * pad)
            positions.append([p for n in lengths + ([pad] if pad else []) for p in range(n)])
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
        }


def fused_head_on_labeled_positions() -> None:
    """Make TRL's fused LM head (SFT and DPO losses) project only the positions that carry a label, on CPU and CUDA.

    TRL does so where its Triton kernels run and scores every position elsewhere, to keep tile shapes fixed for
    compiling backends (Neuron). Eager CPU compiles nothing, and a RAG prompt's answer is ~5% of its tokens: the
    loss and gradients are the same, the SFT step on 2 CPU cores takes 0.66x the time. Another TRL without the
    hook keeps its own choice."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None or getattr(decide, "doctune_labeled_only", False):
        return

    def labeled_only(device) -> bool:
        return device.type in ("cpu", "cuda") or decide(device)

    labeled_only.doctune_labeled_only = True
    trl_utils._use_triton = labeled_only


def with_adapter(model, peft_config):
    if peft_config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def cpt_trainer(job: TrainJob, prec: str, model, peft_config, tokenizer, train, evaluation):
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = with_adapter(model, peft_config)
    extra = {"eval_strategy": "no"}  # held-out perplexity is measured before and after training instead
    args = training_arguments(job, prec, TrainingArguments, **extra)
    collator = CountingCollator(default_data_collator)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.counting_collator = collator
    return trainer


def sft_trainer(job: TrainJob, prec: str, model, peft_config, tokenizer, train, evaluation):
    from trl import SFTConfig, SFTTrainer

    fused_head_on_labeled_positions()
    model = with_adapter(model, peft_config)
    s = job.settings
    extra = {
        "max_length": s["max_length"],
        "packing": s["packing"],
        "packing_strategy": "bfd",
        # Packed rows carry position_ids restarting at each example: attention stays within an example.
        "padding_free": s["packing"],
        "dataset_num_proc": None,
    }
    if evaluation is not None:
        extra |= {
            "eval_strategy": "steps",
            "eval_steps": s["eval_steps"],
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    args = training_arguments(job, prec, SFTConfig, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer)
    collator = trainer.data_collator  # TRL's; with packing it flattens each batch into one padding-free row
    if s["packing"] and not model.config._attn_implementation.startswith("flash"):
        collator = RowPackedCollator(tokenizer.pad_token_id)
    # Set after construction: SFTTrainer refuses a custom collator when packing.
    trainer.counting_collator = trainer.data_collator = CountingCollator(collator)
    return trainer


def preference_losses(loss_type: str, chosen_nll_weight: float) -> dict:
    """TRL's loss list: the preference loss, plus the NLL on the chosen replies (RPO) when it has a weight."""
    if chosen_nll_weight == 0:
        return {"loss_type": [loss_type]}
    return {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, chosen_nll_weight]}


def dpo_trainer(job: TrainJob, prec: str, model, peft_config, tokenizer, train, evaluation):
    """TRL's DPOTrainer. With LoRA/QLoRA it attaches the adapter itself and scores the reference policy with the
    adapter disabled (no second model in memory); `full` uses a frozen reference copy, or reference log-probs
    computed once before training (`reference: precomputed`)."""
    from trl import DPOConfig, DPOTrainer

    fused_head_on_labeled_positions()
    s = job.settings
    extra = {
        "beta": s["beta"],
        **preference_losses(s["loss_type"], s["chosen_nll_weight"]),
        "max_length": s["max_length"],
        "precompute_ref_log_probs": s["method"] == "full" and s["reference"] == "precomputed",
        "dataset_num_proc": None,
    }
    if evaluation is not None:
        extra |= {"eval_strategy": "steps", "eval_steps": s["eval_steps"]}
    args = training_arguments(job, prec, DPOConfig, **extra)
    trainer = DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    trainer.counting_collator = trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


def page_sft_trainer(job: TrainJob, prec: str, model, peft_config, processor, train, evaluation):
    """TRL's SFTTrainer on page images with the model's processor: prompt-completion records (the instruction with its
    image, the JSON reply), loss on the reply only. Pages longer than max_length were left out when the data was
    prepared, so the collator never truncates (truncation would cut image tokens)."""
    from trl import SFTConfig, SFTTrainer

    model = with_adapter(model, peft_config)
    extra = {"max_length": None, "completion_only_loss": True, "dataset_num_proc": None, "remove_unused_columns": False}
    args = training_arguments(job, prec, SFTConfig, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=processor)
    trainer.counting_collator = trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


TRAINERS = {"cpt": cpt_trainer, "sft": sft_trainer, "dpo": dpo_trainer, "page_sft": page_sft_trainer}
