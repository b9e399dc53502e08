"""Per-document work that runs in worker processes: extraction tasks and finishing a document."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from doctune.config import IngestConfig
from doctune.ingest.chunking import chunk_document
from doctune.ingest.clean import clean_pages, document_text, find_headings
from doctune.ingest.pdf import FileProbe, RawPage, extract_pages

PAGES_PER_TASK = 24  # small enough that one large file spreads over every worker


@dataclass
class DocumentResult:
    doc_id: str
    pages: list[dict]
    chunks: list[dict]
    lang: str
    flag_counts: dict[str, int]


def page_tasks(probe: FileProbe) -> list[tuple[int, int]]:
    return [(first, min(first + PAGES_PER_TASK, probe.page_count) - 1) for first in range(0, probe.page_count, PAGES_PER_TASK)]


def extract_task(probe: FileProbe, first: int, last: int, config: IngestConfig) -> list[RawPage]:
    return extract_pages(probe.path, first, last, config.ocr, config.ocr_language, config.ocr_dpi, config.min_page_chars)


@cache
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def detect_language(text: str, sample_chars: int) -> str:
    if not text.strip():
        return "und"
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect is randomized; fix it so reruns agree
    try:
        return detect(text[:sample_chars])
    except LangDetectException:
        return "und"


def finish_document(probe: FileProbe, raw: list[RawPage], config: IngestConfig, tokenizer_file: str) -> DocumentResult:
    doc_id = probe.sha256[:16]
    raw = sorted(raw, key=lambda p: p.page)
    pages = clean_pages(raw, config.furniture_lines, config.furniture_min_repeats, config.min_page_chars)
    text, spans = document_text(pages)
    lang = detect_language(text, config.lang_sample_chars)
    chunks = []
    if text:
        encoding = _tokenizer(tokenizer_file).encode(text, add_special_tokens=False)
        headings = find_headings(text, spans, probe.toc)
        chunks = chunk_document(doc_id, text, encoding.offsets, spans, headings, config.chunking)
    flag_counts: dict[str, int] = {}
    for page in pages:
        for flag in page.flags:
            flag_counts[flag] = flag_counts.get(flag, 0) + 1
    page_rows = [
        {
            "doc_id": doc_id,
            "source": probe.source,
            "sha256": probe.sha256,
            "page": page.page,
            "text": page.text,
            "flags": page.flags,
            "lang": lang,
        }
        for page in pages
    ]
    return DocumentResult(doc_id=doc_id, pages=page_rows, chunks=chunks, lang=lang, flag_counts=flag_counts)
