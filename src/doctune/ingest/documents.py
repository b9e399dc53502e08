"""Per-document work that runs in worker processes: extraction tasks and finishing a document."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache

from doctune import langid
from doctune.citations import document_title
from doctune.config import IngestConfig
from doctune.ingest.chunking import chunk_document
from doctune.ingest.clean import Heading, clean_pages, document_text, find_headings
from doctune.ingest.pdf import FileProbe, RawPage, extract_pages

PAGES_PER_TASK = 24  # small enough that one large file spreads over every worker
SEGMENT_CHARS = 200_000  # tokenized per task: a large document's tokenization spreads too


@dataclass
class DocumentResult:
    doc_id: str
    pages: list[dict]
    chunks: list[dict]
    lang: str
    flag_counts: dict[str, int]
    text: str = ""  # the cleaned document text chunk offsets index
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    headings: list[Heading] = field(default_factory=list)
    title: str = ""  # what citations name the document by


def page_tasks(probe: FileProbe) -> list[tuple[int, int]]:
    return [(first, min(first + PAGES_PER_TASK, probe.page_count) - 1) for first in range(0, probe.page_count, PAGES_PER_TASK)]


def extract_task(probe: FileProbe, first: int, last: int, config: IngestConfig) -> list[RawPage]:
    return extract_pages(probe.path, first, last, config.ocr, config.ocr_language, config.ocr_dpi, config.min_page_chars)


@cache
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def warm_up(tokenizer_file: str) -> None:
    """Load the tokenizer and langdetect's language profiles once, before workers fork and inherit them."""
    _tokenizer(tokenizer_file)
    langid.warm_up()


def clean_document(probe: FileProbe, raw: list[RawPage], config: IngestConfig) -> DocumentResult:
    """Cleaned pages, document text, headings and language; chunks come after tokenization."""
    doc_id = probe.sha256[:16]
    pages = clean_pages(
        sorted(raw, key=lambda p: p.page), config.furniture_lines, config.furniture_min_repeats, config.min_page_chars
    )
    text, spans = document_text(pages)
    lang = langid.detect_language(text, config.lang_sample_chars)
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
    return DocumentResult(
        doc_id=doc_id, pages=page_rows, chunks=[], lang=lang, flag_counts=flag_counts,
        text=text, spans=spans, headings=find_headings(text, spans, probe.toc) if text else [],
        title=document_title(probe.title, probe.source),
    )  # fmt: skip


def segments(doc: DocumentResult, target_chars: int = SEGMENT_CHARS) -> list[tuple[int, int]]:
    """Cut the document text at page starts into pieces of about target_chars, tokenized in parallel.

    A cut falls right after a page separator, where whitespace already splits pre-tokens.
    """
    if not doc.text:
        return []
    cuts = [0]
    for _, start, _ in doc.spans[1:]:
        if start - cuts[-1] >= target_chars:
            cuts.append(start)
    cuts.append(len(doc.text))
    return list(itertools.pairwise(cuts))


def tokenize_segment(tokenizer_file: str, text: str, start: int) -> list[tuple[int, int]]:
    """Token character offsets of one segment, shifted to document coordinates."""
    encoding = _tokenizer(tokenizer_file).encode(text, add_special_tokens=False)
    return [(a + start, b + start) for a, b in encoding.offsets]


def chunk_clean_document(doc: DocumentResult, offsets: list[tuple[int, int]], config: IngestConfig) -> DocumentResult:
    chunks = chunk_document(doc.doc_id, doc.text, offsets, doc.spans, doc.headings, config.chunking) if doc.text else []
    doc.chunks = [{**chunk, "title": doc.title, "lang": doc.lang} for chunk in chunks]
    return doc
