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
        self.real += sum(len(example["input_ids"]) for example in examples)
        self.total += batch["input_ids"].numel()
        return batch

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


def cpt_trainer(job: TrainJob, prec: str, model, tokenizer, train, evaluation):
    from transformers import Trainer, TrainingArguments, default_data_collator

    extra = {"eval_strategy": "no"}  # held-out perplexity is measured before and after training instead
    args = training_arguments(job, prec, TrainingArguments, **extra)
    collator = CountingCollator(default_data_collator)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.counting_collator = collator
    return trainer


def sft_trainer(job: TrainJob, prec: str, model, tokenizer, train, evaluation):
    from trl import SFTConfig, SFTTrainer

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
    # Wrapped after construction: SFTTrainer builds its own (padding-free) collator when packing.
    trainer.counting_collator = trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


TRAINERS = {"cpt": cpt_trainer, "sft": sft_trainer}
