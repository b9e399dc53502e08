"""Merge (adapter into the base weights) and quantize (GGUF for llama.cpp/Ollama, NF4 for GPUs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from doctune.config.base import Section


class MergeConfig(Section):
    """The trained adapter is merged into full weights, checked logit by logit against the adapter."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on CPU; QLoRA adapters merge into the unquantized base"
    )
    max_logit_diff: float | None = Field(
        None, gt=0, description="largest |logit| gap allowed between adapter and merged model; null: 1e-3 fp32, 0.5 bf16"
    )
    verify_prompts: list[str] = Field(
        default_factory=lambda: [
            "What is this documentation about?",
            "Summarize the most important steps it describes in two sentences.",
            "Explain one term the documentation defines.",
            "Tell me about the weather on Mars.",
        ],
        min_length=1,
        description="user turns (with the model's system prompt) whose logits must agree before and after merging",
    )


class QuantizeConfig(Section):
    """Quantized variants of the merged model, each scored on held-out text and a timed generation."""

    variants: list[str] = Field(
        default_factory=lambda: ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q4_0", "nf4"],
        min_length=1,
        description="gguf-<type> for llama.cpp/Ollama: f16, bf16, q8_0, q5_0, q4_0 (doctune's writer) or the K-quants "
        "q4_k_m, q5_k_m, q6_k, ... (llama.cpp's quantizer, from f16); nf4 (bitsandbytes) for GPUs",
    )
    imatrix_blocks: int = Field(
        64,
        ge=0,
        description="blocks of synth's CPT domain text (block_size tokens each) the K-quants' importance matrix is "
        "computed on: llama.cpp's quantizer keeps the weights these documents use most precise; 0: no importance matrix",
    )
    eval_blocks: int = Field(64, ge=1, description="held-out domain blocks scored by every variant")
    block_size: int = Field(256, ge=16, description="tokens per perplexity block")
    generate_tokens: int = Field(32, ge=1, description="greedy tokens generated per check (and timed)")
    prompt: str = Field("What is this documentation about?", description="user turn of the generation check")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: list[str]) -> list[str]:
        odd = [v for v in variants if v != "nf4" and not (v.startswith("gguf-") and v[5:].replace("_", "").isalnum())]
        if odd:
            raise ValueError(f"variants {odd}: expected gguf-<ggml type> or nf4")
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants listed twice: {variants}")
        return variants
