"""Serving: the registry's champion behind llama.cpp's OpenAI-compatible server (`doctune serve`)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from doctune.config.base import Section, absolute
from doctune.config.synth import EndpointConfig

EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"


class ServeConfig(Section):
    """What `doctune serve` serves, where, and what it logs."""

    alias: str = Field("champion", description="registry alias to serve and follow (champion, challenger, ...)")
    version: str | None = Field(
        None,
        description="serve this registered version and do not follow the alias (what a cluster's InferenceService "
        "pins: `doctune deploy` moves it); null: serve and follow serve.alias",
    )
    variant: str = Field(
        "gated",
        description="quantized variant of the version to serve (a gguf-* variant); gated: the one the eval gate held to "
        "its rules (q4_k_m, or q8_0 where q4_k_m lost too much)",
    )
    host: str = Field("127.0.0.1", description="address the server listens on")
    port: int = Field(
        8000, ge=0, le=65535, description="port of the OpenAI-compatible endpoint (/v1/chat/completions); 0: any free one"
    )
    poll_seconds: float = Field(
        30.0, gt=0, description="how often the alias is checked; a moved alias is served without dropping requests"
    )
    retrieve: bool = Field(
        True,
        description="a question sent without context gets the retrieval.top_k best passages of the index the version "
        "was gated with (the retriever stage's), and the reply cites them; versions without an index answer as asked",
    )
    apply_abstention_threshold: bool = Field(
        True,
        description="answer a question asked with retrieved context by the abstention sentence where its abstention "
        "score reaches the gate's threshold for the served variant (versions without one are served as they are)",
    )
    n_ctx: int = Field(4096, ge=256, description="llama.cpp context length (prompt and reply tokens)")
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads llama.cpp generates and reads prompts with; 0: llama.cpp's defaults (half the cores "
        "to generate, every core for prompts)",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="longest wait for the model's reply to one request")
    startup_timeout_s: float = Field(180.0, gt=0, description="longest wait for a llama.cpp server to come up")
    log_dir: Path | None = Field(None, description="request and feedback logs (JSONL); null: <workdir>/serving")
    max_log_bytes: int = Field(
        64 * 2**20, ge=1024, description="a log file is rotated (renamed with a timestamp) when it grows past this size"
    )
    pii_patterns: list[str] = Field(
        default_factory=lambda: [EMAIL],
        description="regular expressions redacted from logged prompts and replies (secrets of the environment are "
        "always redacted); default: e-mail addresses",
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # `--set serve.version=3`

    @field_validator("pii_patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"serve.pii_patterns: {pattern!r} is not a regular expression ({exc})") from None
        return value

    @field_validator("log_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return absolute(value)


class FlywheelConfig(Section):
    """What synth takes from serving: failures mined from the request and feedback logs, relabeled, trained on."""

    enabled: bool = Field(
        True, description="read the serving logs (nothing happens where there are none; the weekly retrain picks them up)"
    )
    log_dir: Path | None = Field(
        None, description="the request and feedback logs `doctune serve` writes; null: serve.log_dir (<workdir>/serving)"
    )
    labels_dir: Path | None = Field(
        None,
        description="labeled failures: Label Studio JSON exports or JSONL rows {request_id, answer | verdict}; "
        "null: <log_dir>/labels",
    )
    upsample: int = Field(3, ge=1, le=20, description="times each relabeled failure appears in the SFT training data")
    positive_share: float = Field(
        0.4, ge=0, lt=1,
        description="share of the flywheel's SFT examples that are answers users rated up (what already works, kept "
        "so retraining on failures does not lose it); fewer are used where fewer were rated",
    )  # fmt: skip
    production_fraction: float = Field(
        0.3, ge=0, lt=1,
        description="share of relabeled failures held out (by a hash of the question) as the production eval set the "
        "gate reports; never trained on",
    )  # fmt: skip
    min_grounding: float = Field(
        0.5, ge=0, le=1,
        description="an answer given with context is mined as ungrounded where fewer than this share of its content "
        "words occur in the passages",
    )  # fmt: skip

    consistency_samples: int = Field(
        0, ge=0, le=16,
        description="self-consistency: answers sampled again per logged question through consistency_endpoint (the "
        "served model, e.g. `doctune serve`: only answers of the version it serves are checked); an answer that "
        "agrees with them below min_agreement is mined as uncertain; 0: off",
    )  # fmt: skip
    consistency_endpoint: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(
            base_url="http://127.0.0.1:8000/v1",
            temperature=0.8,
            max_tokens=256,
            response_format="none",
            api_key_env="DOCTUNE_SERVE_API_KEY",
        ),
        description="where the answers are sampled again (sampling temperature above 0)",
    )
    consistency_max_items: int = Field(
        200, ge=1, description="at most this many of the newest unrated, unlabeled answers are sampled again per run"
    )
    min_agreement: float = Field(
        0.3, ge=0, le=1, description="mean token F1 between the logged answer and the samples below which it is uncertain"
    )

    @field_validator("log_dir", "labels_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return absolute(value)
