"""The page-extraction track (`task: page_extraction`): rendered PDF pages to strict JSON with a vision-language model.

Its sections: `pages` (render, labels, hard negatives, split), `page_sft` (LoRA/QLoRA SFT of the VLM),
`page_quantize` (NF4, GGUF where the architecture allows) and `page_gate` (field accuracy, JSON validity, latency).
The defaults follow the guide the track implements (Qwen3-VL-8B page extraction): r 16, alpha 32, LR 2e-4, warmup
0.03, effective batch 32, one epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from doctune.config.base import Section, absolute
from doctune.config.training import LoraSettings, TrainingConfig

AUGMENTATIONS = ("rotate", "scan_noise", "downscale", "stamp")


class RenderSettings(Section):
    """Pages rendered once with pymupdf and cached by digest: the smallest size that keeps the text readable."""

    dpi: int = Field(100, ge=36, le=600, description="render resolution")
    max_pixels: int = Field(
        1_003_520, ge=16_384, description="pixel cap per page image (width x height); larger renders are scaled down"
    )


class AugmentSettings(Section):
    """Hard negatives: training pages made harder (rotated, scanned, downscaled, stamped); their labels are the page's."""

    fraction: float = Field(0.2, ge=0, le=1, description="share of training pages given one augmented copy")
    kinds: list[Literal["rotate", "scan_noise", "downscale", "stamp"]] = Field(
        default_factory=lambda: list(AUGMENTATIONS), description="augmentations drawn from, one per copy"
    )
    seed: int = Field(0, description="which pages and which augmentation")


class SplitSettings(Section):
    """Train / validation / test by document: no document's pages are on two sides."""

    train: float = Field(0.8, gt=0, lt=1, description="share of documents for training")
    validation: float = Field(0.1, ge=0, lt=1, description="share of documents for validation (merge and NF4 checks)")
    seed: int = Field(0, description="which documents go where")

    @model_validator(mode="after")
    def _leaves_test(self) -> SplitSettings:
        if self.train + self.validation >= 1:
            raise ValueError(f"train ({self.train}) + validation ({self.validation}) must leave a share for the test split")
        return self


class PagesConfig(Section):
    """PDF pages rendered to images with their JSON labels, from the user's labels or from the text layer."""

    pdfs: Path | None = Field(None, description="PDF folder or file; null: ingest.pdfs")
    labels: Path | None = Field(
        None,
        description='JSONL of {"pdf", "page", "fields": {...}} (page numbers from 1); null: labels derived from each '
        "page's text layer (title, section, running header, page number, first paragraph, table rows)",
    )
    schema_file: Path | None = Field(
        None, description="JSON Schema the labels and the model's outputs must follow; null: the self-supervised schema"
    )
    instruction: str = Field(
        "Extract this page's fields as JSON. Reply with the JSON object only.",
        min_length=1,
        description="the user turn beside the page image (short, the same for every page)",
    )
    max_pages_per_document: int = Field(0, ge=0, description="0: every page")
    render: RenderSettings = Field(default_factory=RenderSettings, description="page images")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description="hard negatives in the training split")
    split: SplitSettings = Field(default_factory=SplitSettings, description="by document")

    @field_validator("pdfs", "labels", "schema_file")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return absolute(value)


class PageLoraSettings(LoraSettings):
    """The adapter on the language model's attention projections; the vision encoder stays frozen."""

    alpha: int = Field(32, ge=1, description="scaling numerator (the guide: 16-32)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input (the guide: 0-0.05)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module-name suffixes, matched in the language model only (never the vision encoder)",
    )
    include_mlp: bool = Field(False, description="also adapt the language model's MLP (gate_proj, up_proj, down_proj)")
    train_projector: bool = Field(
        False,
        description="train the vision-to-text projector in full (beside the adapter; method full trains it only with this)",
    )


class PageSftConfig(TrainingConfig):
    """SFT of the vision-language model on page images (TRL's SFTTrainer with the model's processor), loss on the
    assistant JSON only."""

    stage: ClassVar[str] = "page_sft"

    lora: PageLoraSettings = Field(default_factory=PageLoraSettings, description="the adapter of methods lora and qlora")
    learning_rate: float | None = Field(
        None, gt=0, description="null: the guide's: 2e-4 for lora, 1.5e-4 for qlora, 2e-5 for full"
    )
    batch_size: int = Field(1, ge=1, description="pages per device per step")
    gradient_accumulation_steps: int = Field(32, ge=1, description="effective batch = batch_size x this x processes")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps the learning rate warms up over")
    max_output_tokens: int = Field(512, ge=16, description="longest JSON reply trained on and generated (the guide: 256-768)")
    max_length: int = Field(
        4096, ge=64, description="tokens per example, image tokens included; a page that needs more is skipped and reported"
    )
    kernels: Literal["auto", "none"] = Field(
        "auto", description="PyTorch's own layers either way: liger-kernel's fused layers are for the text models"
    )


class PageQuantizeConfig(Section):
    """Quantized variants of the merged VLM, each checked on validation pages against the merged model."""

    variants: list[str] = Field(
        default_factory=lambda: ["nf4"],
        description="nf4 (bitsandbytes, checked in transformers); gguf-<type> with the vision projector (mmproj) where "
        "llama.cpp supports the architecture",
    )
    check_pages: int = Field(8, ge=1, description="validation pages each variant extracts, compared with the merged model")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: list[str]) -> list[str]:
        odd = [v for v in variants if v != "nf4" and not v.startswith("gguf-")]
        if odd:
            raise ValueError(f"variants {odd}: expected nf4 or gguf-<ggml type>")
        return variants


class PageGateConfig(Section):
    """Candidate vs champion vs base on the test pages: field accuracy, JSON validity, schema conformance, latency."""

    max_pages: int = Field(0, ge=0, description="test pages scored; 0: all")
    retry_invalid: bool = Field(
        True, description="an output that is not valid JSON is asked for once more; both attempts are counted, none repaired"
    )
    min_json_validity: float = Field(0.99, ge=0, le=1, description="rule: share of pages whose reply is valid JSON")
    beat_champion: bool = Field(
        True,
        description="rule: per-page field accuracy above the champion's (the base's before a first promotion), paired "
        "randomization test p < significance",
    )
    significance: float = Field(0.05, gt=0, lt=1, description="paired randomization test level")
    permutations: int = Field(10_000, ge=100, description="paired randomization test resamples")
    latency_goal_ms: float = Field(
        1000,
        gt=0,
        description="p95 milliseconds per page the serving setup aims at; reported beside the measured p50/p95",
    )


PAGE_TASK = "page_extraction"
Task = Literal["documents", "page_extraction"]
