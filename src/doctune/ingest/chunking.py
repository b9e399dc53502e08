"""Chunking in token space over the cleaned document text.

The document is tokenized once; every chunk is a slice doc_text[char_start:char_end] of it.
- `tokens`: windows of `size` tokens, evenly spaced, overlapping by at least `overlap`;
- `sections`: never crosses a heading; packs whole paragraphs up to `size`, windows only
  paragraphs longer than that.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass

from doctune.config import ChunkingConfig
from doctune.ingest.clean import Heading, section_number


@dataclass
class Span:
    first: int  # first token index
    last: int  # one past the last token index

    @property
    def size(self) -> int:
        return self.last - self.first


def windows(first: int, last: int, size: int, overlap: int) -> list[Span]:
    """Token windows covering [first, last), evenly spaced so that consecutive ones share at least `overlap`."""
    length = last - first
    if length <= size:
        return [Span(first, last)]
    count = math.ceil((length - size) / (size - overlap)) + 1
    stride = (length - size) / (count - 1)
    return [Span(first + round(i * stride), first + round(i * stride) + size) for i in range(count)]


def _paragraphs(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in re.finditer(r"\S(?:.*?\S)?(?=\n\n|$)", text[start:end], re.S)]


class DocumentChunker:
    def __init__(self, text: str, offsets: list[tuple[int, int]], config: ChunkingConfig):
        self.text = text
        self.offsets = offsets
        self.token_starts = [start for start, _ in offsets]
        self.config = config

    def token_at(self, char: int) -> int:
        """Index of the first token starting at or after a character offset."""
        return bisect.bisect_left(self.token_starts, char)

    def token_spans(self, headings: list[Heading]) -> list[Span]:
        n = len(self.offsets)
        cfg = self.config
        if cfg.mode == "tokens":
            return windows(0, n, cfg.size, cfg.overlap) if n else []
        bounds = sorted({0, len(self.text), *(h.offset for h in headings)})
        spans: list[Span] = []
        for sec_start, sec_end in itertools.pairwise(bounds):
            current: Span | None = None
            for p_start, p_end in _paragraphs(self.text, sec_start, sec_end):
                para = Span(self.token_at(p_start), self.token_at(p_end))
                if para.size == 0:
                    continue
                if current is not None and para.last - current.first <= cfg.size:
                    current = Span(current.first, para.last)
                    continue
                if current is not None:
                    spans.append(current)
                    current = None
                if para.size <= cfg.size:
                    current = para
                else:
                    spans.extend(windows(para.first, para.last, cfg.size, cfg.overlap))
            if current is not None:
                spans.append(current)
        return self._merge_small(spans)

    def _merge_small(self, spans: list[Span]) -> list[Span]:
        """Fold chunks under min_tokens into a neighbour when the result still fits."""
        cfg = self.config
        out: list[Span] = []
        pending: Span | None = None
        for span in spans:
            if pending is not None:
                if span.last - pending.first <= cfg.size:
                    span = Span(pending.first, span.last)
                else:
                    out.append(pending)
                pending = None
            if span.size < cfg.min_tokens:
                if out and span.last - out[-1].first <= cfg.size:
                    out[-1] = Span(out[-1].first, span.last)
                else:
                    pending = span
                continue
            out.append(span)
        if pending is not None:
            out.append(pending)
        return out

    def char_range(self, span: Span) -> tuple[int, int]:
        start = self.offsets[span.first][0]
        end = self.offsets[span.last - 1][1]
        # Byte-level BPE tokens carry their leading space: trim so chunks start and end on text.
        while start < end and self.text[start].isspace():
            start += 1
        while end > start and self.text[end - 1].isspace():
            end -= 1
        return start, end


def section_parents(headings: list[Heading]) -> list[str]:
    """Per heading, the title of the nearest earlier heading one level up or more ("3.4. /bin" for "3.4.1. Purpose"):
    what tells apart the many sections a standard or a reference manual titles alike; "" at the top."""
    parents: list[str] = []
    open_: list[Heading] = []  # the headings whose sections the current one is inside
    for heading in headings:
        while open_ and open_[-1].level >= heading.level:
            open_.pop()
        parent = open_[-1].title if open_ else ""
        number, parent_number = section_number(heading.title), section_number(parent)
        if "." in number and parent_number and parent_number != number.rsplit(".", 1)[0]:
            parent = ""  # "3.13.2" under "3.11": the "3.13" heading was not found, and a wrong parent misleads
        parents.append(parent)
        open_.append(heading)
    return parents


def chunk_document(
    doc_id: str,
    text: str,
    offsets: list[tuple[int, int]],
    page_spans: list[tuple[int, int, int]],
    headings: list[Heading],
    config: ChunkingConfig,
) -> list[dict]:
    chunker = DocumentChunker(text, offsets, config)
    page_starts = [start for _, start, _ in page_spans]
    heading_offsets = [h.offset for h in headings]

    def page_of(char: int) -> int:
        return page_spans[max(0, bisect.bisect_right(page_starts, char) - 1)][0]

    def section_of(start: int, end: int) -> int:
        # The heading whose region covers most of the chunk (-1: none).
        best, best_len = -1, 0
        i = bisect.bisect_right(heading_offsets, start) - 1
        while i < len(headings) and (i < 0 or headings[i].offset < end):
            region_start = headings[i].offset if i >= 0 else 0
            region_end = headings[i + 1].offset if i + 1 < len(headings) else len(text)
            covered = min(end, region_end) - max(start, region_start)
            if i >= 0 and covered > best_len:
                best, best_len = i, covered
            i += 1
        return best

    parents = section_parents(headings)

    chunks = []
    for span in chunker.token_spans(headings):
        start, end = chunker.char_range(span)
        if start >= end:
            continue
        section = section_of(start, end)
        chunks.append(
            {
                "chunk_id": f"{doc_id}-{len(chunks):04d}",
                "doc_id": doc_id,
                "page_start": page_of(start),
                "page_end": page_of(end - 1),
                "char_start": start,
                "char_end": end,
                "n_tokens": span.size,
                "section": headings[section].title if section >= 0 else "",
                "section_parent": parents[section] if section >= 0 else "",
                "text": text[start:end],
            }
        )
    return chunks
