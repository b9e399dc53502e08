"""Ingest: PDFs to cleaned pages and token-sized chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from doctune.config.base import Section, absolute


class ChunkingConfig(Section):
    """How cleaned pages are cut into chunks, counted in the base model's tokens."""

    mode: Literal["tokens", "sections"] = Field(
        "sections", description="sections: split at headings and paragraphs; tokens: fixed windows"
    )
    size: int = Field(384, gt=0, description="tokens per chunk (base_model's tokenizer)")
    overlap: int = Field(48, ge=0, description="tokens shared by consecutive windows; must be < size")
    min_tokens: int = Field(48, ge=1, description="smaller chunks merge into a neighbour when it fits")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingConfig:
        if self.overlap >= self.size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than size ({self.size})")
        if self.min_tokens > self.size:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed size ({self.size})")
        return self


class IngestConfig(Section):
    """Which PDFs are read and how their pages are cleaned."""

    pdfs: Path = Field(Path("pdfs"), description="folder searched recursively for *.pdf (or pass --pdfs)")
    workers: int = Field(0, ge=0, description="worker processes; 0 = one per CPU core")
    ocr: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: OCR image-only pages when tesseract is installed; always; never"
    )
    ocr_language: str = Field("eng", description="tesseract language(s), e.g. eng+deu")
    ocr_dpi: int = Field(300, ge=72, le=1200, description="resolution pages are rendered at for OCR")
    min_page_chars: int = Field(16, ge=0, description="a page with fewer characters than this after cleaning has no usable text")
    furniture_min_repeats: int = Field(
        3, ge=2, description="a line at a page edge recurring on this many pages is a header/footer, removed"
    )
    furniture_lines: int = Field(2, ge=1, le=5, description="lines examined at the top and bottom of each page")
    lang_sample_chars: int = Field(4000, ge=200, description="characters per document sampled for language detection")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig, description="how pages become chunks")

    @field_validator("pdfs")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return absolute(value)
