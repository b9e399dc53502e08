"""The eval gate: candidate, champion and base model on the same eval sets, and the rules a candidate must meet."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from doctune.config.base import Section
from doctune.config.synth import EndpointConfig


class GateRules(Section):
    """What a candidate must meet to be promoted; paired randomization tests where items are paired."""

    min_f1_vs_champion: float = Field(0.98, gt=0, description="candidate golden F1 >= this x champion's")
    min_citation_precision_vs_champion: float = Field(
        0.9, ge=0, le=1,
        description="candidate citation precision (cited passages that hold the answer) not significantly below this "
        "x champion's (the base model's before a first promotion; paired bootstrap); 0 turns the rule off, as it "
        "must be with synth.citations off once a citing champion exists",
    )  # fmt: skip
    beat_base: bool = Field(True, description="candidate golden F1 must be significantly above the base model's (p < alpha)")
    abstention_tolerance: float = Field(0.02, ge=0, le=1, description="abstention accuracy >= champion's minus this")
    min_format_compliance: float = Field(
        0.95, ge=0, le=1, description="share of structured-output probes that validate; the base model's share where lower"
    )
    min_probes_vs_base: float = Field(0.95, ge=0, description="capability probe accuracy >= this x base's")
    max_general_ppl_vs_base: float = Field(1.15, gt=0, description="general-text perplexity <= this x base's")
    max_domain_ppl_vs_base: float = Field(
        1.0, gt=0, description="held-out domain text perplexity <= this x base's: tuning must have kept the domain knowledge"
    )
    min_abstention_accuracy: float = Field(0.6, ge=0, le=1, description="share of unanswerable questions the candidate declines")
    max_false_abstention: float = Field(0.15, ge=0, le=1, description="share of answerable questions the candidate declines")
    max_quantized_ppl_ratio: float = Field(1.02, gt=0, description="each gated variant's perplexity <= this x merged")
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="level of the paired tests (significantly worse than the champion rejects) and of the detectable differences",
    )
    permutations: int = Field(10000, ge=100, description="sign flips of the paired randomization test")
    min_detectable_f1: float = Field(
        0.05,
        gt=0,
        description="the golden F1 difference the eval sets must be able to detect at alpha and 80% power; larger sets "
        "are needed when it is not (1 or more: not checked)",
    )
    min_detectable_abstention: float = Field(
        0.15,
        gt=0,
        description="the abstention accuracy difference the unanswerable set must be able to detect at alpha and 80% "
        "power (1 or more: not checked)",
    )
    min_detectable_citation_precision: float = Field(
        0.2,
        gt=0,
        description="the citation precision shortfall below the champion's floor (min_citation_precision_vs_champion) "
        "that the candidate's citations on the golden set must be able to show at alpha and 80% power; checked once "
        "the champion cites (1 or more: not checked)",
    )
    bootstrap_resamples: int = Field(2000, ge=100, description="resamples of the bootstrap confidence intervals (95%)")
    min_judge_win_rate: float = Field(
        0.5, ge=0, le=1,
        description="with a judge (gate.judge.enabled): the candidate's pairwise win rate against the champion, ties "
        "counting half, must reach this",
    )  # fmt: skip


class JudgeConfig(Section):
    """An LLM behind an OpenAI-compatible API judging candidate against champion answers, both orders."""

    enabled: bool = Field(False, description="ask the judge (a rule on its win rate follows: rules.min_judge_win_rate)")
    endpoint: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(temperature=0.0, max_tokens=32, api_key_env="DOCTUNE_JUDGE_API_KEY"),
        description="the judge model's API (key in its api_key_env, never logged)",
    )
    max_items: int = Field(
        256, ge=1, description="golden and production items judged (each twice, A/B swapped); production items first"
    )


class GateConfig(Section):
    """Candidate (merged + variants), champion (or base) and base scored on the same golden, unanswerable and text sets."""

    variants: list[str] = Field(
        default_factory=lambda: ["gguf-q4_k_m"],
        description="quantized variants that ship with a promoted version: evaluated like the merged model, held to "
        "max_quantized_ppl_ratio (the others are reported only); one not produced, or above the ratio, gives way to "
        "its fallback",
    )
    variant_fallbacks: dict[str, str] = Field(
        default_factory=lambda: {"gguf-q4_k_m": "gguf-q8_0"},
        description="gated variant -> the variant gated in its place when it was not produced or its perplexity is "
        "above max_quantized_ppl_ratio (followed as a chain; the report says why); {}: none",
    )
    max_golden: int = Field(
        512,
        ge=1,
        description="golden questions scored per model: enough for the paired tests to see a real difference; a larger "
        "set is cut to a stratified subset (round-robin over document and question type)",
    )
    max_unanswerable: int = Field(128, ge=1, description="unanswerable questions scored per model (abstention)")
    max_closed_book: int = Field(
        64, ge=0, description="golden questions also asked without context (closed-book F1: what the model itself knows); 0: off"
    )
    max_new_tokens: int = Field(64, ge=1, description="greedy tokens per answer")
    batch_size: int = Field(32, ge=1, description="prompts generated together (transformers)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="weights of the transformers models scored (all in the same precision): auto is bf16 where the "
        "hardware multiplies it (a bf16 GPU, a CPU with AMX: 2.2x fp32 there), fp32 elsewhere",
    )
    perplexity_blocks: int = Field(64, ge=1, description="blocks of held-out domain text and of general text")
    block_size: int = Field(256, ge=16, description="tokens per perplexity block")
    samples: int = Field(5, ge=0, description="answers shown side by side in the report")
    cache_scores: bool = Field(
        True,
        description="reuse a model's scores where the same model files were scored on the same sets with the same "
        "settings and code (the base model and the champion on a rerun of the same data)",
    )
    hallucination_alpha: float = Field(
        0.1, ge=0, lt=1,
        description="bound on the share of unanswerable questions answered, kept by an abstention threshold chosen "
        "by conformal risk control on a calibration split (the model also declines where its score for the "
        "abstention sentence reaches it); shipped with the version; 0: no threshold",
    )  # fmt: skip
    hallucination_confidence: float = Field(
        0.9, gt=0, lt=1,
        description="probability, over the calibration draw, that the hallucination rate at the threshold is at most "
        "hallucination_alpha; stating it at all takes log(1 - confidence) / log(1 - alpha) calibration items (22 at "
        "the defaults); fewer: insufficient evidence",
    )  # fmt: skip
    calibration_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of the unanswerable items that set the threshold; the others test it"
    )
    seed: int = Field(13, description="seed of the calibration/test split (a hash of each question and its position)")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="pairwise LLM judge of candidate vs champion")
    rules: GateRules = Field(default_factory=GateRules, description="what a candidate must meet to be promoted")

    @model_validator(mode="after")
    def _fallbacks_end(self) -> GateConfig:
        for start in self.variant_fallbacks:
            seen, variant = [start], start
            while (variant := self.variant_fallbacks.get(variant)) is not None:
                if variant in seen:
                    raise ValueError(f"variant_fallbacks loop: {' -> '.join([*seen, variant])}")
                seen.append(variant)
        return self
