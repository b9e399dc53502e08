"""PDF reading with pymupdf: probe a file, extract a page range (with OCR where needed).

Runs in worker processes, so it imports nothing heavier than pymupdf.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pymupdf

from doctune.artifacts import sha256_file
from doctune.ingest.listing import os_reason

pymupdf.TOOLS.mupdf_display_errors(False)  # damaged files are reported per file, not sprayed on stderr


@dataclass
class FileProbe:
    path: Path
    source: str  # path relative to the input folder
    size: int
    sha256: str
    status: str  # ok | skipped (set here); partial | duplicate (set later)
    reason: str = ""
    page_count: int = 0
    toc: list[tuple[int, str, int]] = field(default_factory=list)  # (level, title, 1-based page)
    title: str = ""  # the document's own title (PDF metadata), empty where it states none


@dataclass
class RawPage:
    page: int  # 1-based
    blocks: list[str]  # text blocks in reading order, lines separated by newlines
    has_images: bool
    ocr: bool = False
    error: str = ""


def probe(path: Path, source: str) -> FileProbe:
    """Open a file just far enough to know whether and how it can be ingested.

    A file that cannot be read (no permission, removed meanwhile, an I/O error) is skipped with the reason; its
    sha256 stays empty, which also keeps it out of duplicate detection and the sources artifact.
    """
    try:
        size = path.stat().st_size
        digest = sha256_file(path)
        with open(path, "rb") as handle:
            head = handle.read(1024)
    except OSError as exc:
        reason = f"cannot be read: {os_reason(exc)}"
        return FileProbe(path=path, source=source, size=0, sha256="", status="skipped", reason=reason)
    result = FileProbe(path=path, source=source, size=size, sha256=digest, status="skipped")
    if size == 0:
        result.reason = "empty file (0 bytes)"
        return result
    if b"%PDF-" not in head:
        result.reason = f"not a PDF: no %PDF- header (starts with {head[:16]!r})"
        return result
    try:
        doc = pymupdf.open(path, filetype="pdf")
    except Exception as exc:  # pymupdf raises several types for broken files
        result.reason = f"cannot be opened as PDF (damaged or truncated): {exc}"
        return result
    with doc:
        if doc.needs_pass:
            result.reason = "encrypted: a password is required to read it"
            return result
        if doc.page_count == 0:
            result.reason = "no readable pages (damaged or truncated)"
            return result
        result.page_count = doc.page_count
        result.title = str((doc.metadata or {}).get("title") or "")
        try:
            result.toc = [(level, title, page) for level, title, page, *_ in doc.get_toc(simple=True)]
        except Exception:
            result.toc = []  # a broken outline only costs us section titles
    result.status = "ok"
    return result


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def _page_blocks(page, textpage=None) -> list[str]:
    # sort=True: top-to-bottom, left-to-right, pymupdf's reading order; type 0 = text blocks.
    blocks = page.get_text("blocks", sort=True, textpage=textpage)
    return [b[4] for b in blocks if b[6] == 0 and b[4].strip()]


@lru_cache(maxsize=4)
def _open(path: Path) -> pymupdf.Document:
    """One open document per worker and file: opening re-reads the outline, costly on large manuals."""
    return pymupdf.open(path, filetype="pdf")


def close_cached() -> None:
    """Close the documents _open keeps; run in each new worker so none is shared with its parent."""
    _open.cache_clear()


def extract_pages(path: Path, first: int, last: int, ocr: str, ocr_language: str, ocr_dpi: int, min_chars: int) -> list[RawPage]:
    """Pages first..last (0-based, inclusive) of one file."""
    pages = []
    use_ocr = ocr != "never" and tesseract_available()
    doc = _open(path)
    for index in range(first, last + 1):
        try:
            page = doc.load_page(index)
            has_images = bool(page.get_images(full=False))
            blocks = [] if ocr == "always" else _page_blocks(page)
            chars = sum(len(b.strip()) for b in blocks)
            ocr_used = False
            if use_ocr and (ocr == "always" or (chars < min_chars and has_images)):
                textpage = page.get_textpage_ocr(language=ocr_language, dpi=ocr_dpi, full=True)
                blocks = _page_blocks(page, textpage=textpage)
                ocr_used = True
            pages.append(RawPage(page=index + 1, blocks=blocks, has_images=has_images, ocr=ocr_used))
        except Exception as exc:
            pages.append(RawPage(page=index + 1, blocks=[], has_images=False, error=f"{type(exc).__name__}: {exc}"))
    return pages
