"""From raw page blocks to cleaned page text: page furniture, hyphenation, Unicode, whitespace, headings."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from doctune.ingest.pdf import RawPage

PAGE_SEPARATOR = "\n\n"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\u00ad]")  # controls, zero-width space, soft hyphen
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_DIGITS = re.compile(r"\d+")
_PAGE_NUMBER = re.compile(
    r"^(?:page\s*)?(?:\d{1,4}|[ivxlcdm]{1,7})(?:\s*(?:/|of)\s*\d{1,4})?$|^[-–—]\s*\d{1,4}\s*[-–—]$",
    re.IGNORECASE,
)
_HYPHEN_END = re.compile(r"(?<=[^\W\d_])-$")
_NUMBERED_HEADING = re.compile(r"^(?:(?:\d+(?:\.\d+)*\.?|[A-Z]\.\d+(?:\.\d+)*)\s+|(?:Chapter|Appendix|Part)\s+\w+[.:]?\s+)\S")
_WRAPPED_HEADING = re.compile(r"^(?:\d+(?:\.\d+)+\.?|[A-Z](?:\.\d+)+\.?)\s+\S")
_UNIT = re.compile(r"(?:[kMGT]?(?:Hz|B|bit|bps)|mm|cm|km|ms|kg|°C|%)(?:\W|$)")  # "2.4 GHz", "1.5 mm": a measure
_SECTION_NUMBER = re.compile(r"^(?:\d+(?:\.\d+)*|[A-Z](?:\.\d+)+)\.?$")


@dataclass
class CleanPage:
    page: int
    text: str
    flags: list[str]


@dataclass
class Heading:
    offset: int  # character offset in the document text
    title: str
    level: int = 1  # outline depth: 1 for a chapter, 3 for "3.4.1. Purpose"


def section_number(title: str) -> str:
    """The number a heading starts with: "3.4.1" for "3.4.1. Purpose", "A.1" for "A.1 Scope", "3" for "Chapter 3.
    The Root Filesystem"; "" for none."""
    number = re.match(r"(?:(?i:chapter|appendix|part)\s+(\w+)|(\d+(?:\.\d+)*|[A-Z](?:\.\d+)+))[.:]?(?:\s|$)", title)
    return (number.group(1) or number.group(2)) if number else ""


def numbering_depth(title: str) -> int:
    """How deep a numbered heading sits: "3.4.1. Purpose" -> 3, "A.1 Scope" -> 2, "Chapter 3 ..." -> 1."""
    number = section_number(title)
    return number.count(".") + 1 if number else 1


def normalize_line(line: str) -> str:
    line = unicodedata.normalize("NFKC", line)  # ligatures (ﬁ -> fi), compatibility forms
    line = _CONTROL.sub("", line)
    return _SPACES.sub(" ", line).strip()


def furniture_key(line: str) -> str:
    return _DIGITS.sub("#", line.lower())


def is_page_number(line: str) -> bool:
    return bool(_PAGE_NUMBER.match(line.strip()))


def _edge_lines(blocks: list[list[str]], count: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Positions (block, line) of the first and last `count` lines of a page."""
    positions = [(b, i) for b, lines in enumerate(blocks) for i in range(len(lines))]
    return positions[:count], positions[-count:] if len(positions) > count else positions[count:]


def remove_furniture(pages: list[list[list[str]]], lines_per_edge: int, min_repeats: int) -> list[list[list[str]]]:
    """Drop running headers, footers and page numbers: lines at a page edge that recur across pages."""
    counts: Counter[tuple[str, str]] = Counter()
    for blocks in pages:
        top, bottom = _edge_lines(blocks, lines_per_edge)
        seen = {("top", furniture_key(blocks[b][i])) for b, i in top}
        seen |= {("bottom", furniture_key(blocks[b][i])) for b, i in bottom}
        counts.update(seen)
    cleaned = []
    for blocks in pages:
        top, bottom = _edge_lines(blocks, lines_per_edge)
        drop = set()
        for edge, positions in (("top", top), ("bottom", bottom)):
            for b, i in positions:
                line = blocks[b][i]
                if is_page_number(line):
                    drop.add((b, i))
                    # A short first/last block around a page number is the running header or footer
                    # ("Chapter 3: Invoking Gri" + "7"), even when its title is too rare to repeat.
                    if b in (0, len(blocks) - 1) and len(blocks[b]) <= lines_per_edge:
                        drop.update((b, j) for j in range(len(blocks[b])))
                elif counts[(edge, furniture_key(line))] >= min_repeats:
                    drop.add((b, i))
        kept = [[line for i, line in enumerate(lines) if (b, i) not in drop] for b, lines in enumerate(blocks)]
        cleaned.append([lines for lines in kept if lines])
    return cleaned


def join_block(lines: list[str]) -> str:
    """Lines of one block; a word hyphenated across a line break is joined."""
    out: list[str] = []
    for line in lines:
        if out and _HYPHEN_END.search(out[-1]) and line[:1].islower():
            out[-1] = out[-1][:-1] + line
        else:
            out.append(line)
    return "\n".join(out)


def _garbled(text: str) -> bool:
    """Mostly replacement characters: a font without a usable character map."""
    return text.count("\ufffd") > 0.3 * len(text)


def clean_pages(raw: list[RawPage], lines_per_edge: int, min_repeats: int, min_chars: int) -> list[CleanPage]:
    split = [[[n for n in (normalize_line(x) for x in block.splitlines()) if n] for block in page.blocks] for page in raw]
    split = [[lines for lines in blocks if lines] for blocks in split]
    split = remove_furniture(split, lines_per_edge, min_repeats)
    result = []
    for page, blocks in zip(raw, split):
        text = PAGE_SEPARATOR.join(join_block(lines) for lines in blocks)
        flags = ["ocr"] if page.ocr else []
        if page.error:
            flags.append("error")
            text = ""
        elif text and _garbled(text):
            flags.append("garbled")
            text = ""
        elif len(text) < min_chars:
            text = ""
        if not text and "error" not in flags:
            flags.append("image_only" if page.has_images else "empty")
        result.append(CleanPage(page=page.page, text=text, flags=flags))
    return result


def document_text(pages: list[CleanPage]) -> tuple[str, list[tuple[int, int, int]]]:
    """The cleaned document text (pages with text, joined) and (page, start, end) spans into it.

    Chunk offsets index this string: doc_text[char_start:char_end] == chunk text.
    """
    parts, spans, offset = [], [], 0
    for page in pages:
        if not page.text:
            continue
        if parts:
            offset += len(PAGE_SEPARATOR)
        parts.append(page.text)
        spans.append((page.page, offset, offset + len(page.text)))
        offset += len(page.text)
    return PAGE_SEPARATOR.join(parts), spans


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def find_headings(doc_text: str, spans: list[tuple[int, int, int]], toc: list[tuple[int, str, int]]) -> list[Heading]:
    """Section starts: from the PDF outline where it has one, else from numbered heading lines."""
    headings: list[Heading] = []
    if toc:
        by_page = {page: (start, end) for page, start, end in spans}
        for level, title, page in toc:
            title = normalize_line(title)
            if not title or page not in by_page:
                continue
            start, end = by_page[page]
            # Find the title as a line start on its page; fall back to the page start.
            offset = start
            for match in re.finditer(r"(?m)^.*$", doc_text[start:end]):
                line = match.group(0)
                if _squash(title) in _squash(line) and len(line) <= len(title) + 16:
                    offset = start + match.start()
                    break
            headings.append(Heading(offset, title, level))
    else:
        for block in re.finditer(r"(?s)(?:^|(?<=\n\n)).+?(?=\n\n|$)", doc_text):
            lines = block.group(0).split("\n")
            if len(lines) == 1 and len(lines[0]) <= 80 and _NUMBERED_HEADING.match(lines[0]) and not lines[0].endswith("."):
                headings.append(Heading(block.start(), lines[0], numbering_depth(lines[0])))
            elif len(lines) == 2 and _SECTION_NUMBER.match(lines[0]) and 0 < len(lines[1]) <= 80:
                headings.append(Heading(block.start(), f"{lines[0]} {lines[1]}", numbering_depth(lines[0])))
            elif len(lines) == 2 and _WRAPPED_HEADING.match(lines[0]) and lines[1][:1].islower() and len(block.group(0)) <= 100:
                # "3.13. /opt : Add-on application software" + "packages": a long title wrapped. Only under a
                # heading already found ("3."), and not "2.4 GHz band is used by default in" + "most routers".
                title = f"{lines[0]} {lines[1]}"
                number = section_number(title)
                after = title[len(number) :].lstrip(". ")
                if (
                    not title.endswith((".", ":", ";", ","))
                    and number.rsplit(".", 1)[0] in {section_number(h.title) for h in headings}
                    and not after[:1].islower()
                    and not _UNIT.match(after)
                ):
                    headings.append(Heading(block.start(), title, numbering_depth(title)))
    headings.sort(key=lambda h: h.offset)
    return headings
