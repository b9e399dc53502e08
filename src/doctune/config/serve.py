"""Serving: the registry's champion behind llama.cpp's OpenAI-compatible server (`doctune serve`)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from doctune.config.base import Section, absolute

EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"


class ServeConfig(Section):
    """What `doctune serve` serves, where, and what it logs."""

    alias: str = Field("champion", description="registry alias to serve and follow (champion, challenger, ...)")
    variant: str = Field("gguf-q8_0", description="quantized variant of the version to serve (a gguf-* variant)")
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
