"""Self-supervised page labels from a digital page's text layer, following `SELF_SUPERVISED_SCHEMA`.

Every value is text printed on the page (whitespace collapsed, Latin ligatures spelled out, words broken across a
line joined), so a vision-language model can read it from the page image:

- title: the page's largest heading (a line set larger than the body text, or a bold line of its own);
- section: the number of the first numbered heading ("3.2", "4" for "Chapter 4"), as text;
- running_header: the top line the document repeats at the top of its pages (digits aside), without the page number;
- page_number: the printed page number on the first or last line of the page (top or bottom margin);
- first_paragraph: the first body paragraph (not a heading, header, footer, table, code or footnote), cut to at most
  300 characters at a word boundary;
- table_rows: the rows of the first table pymupdf finds, cells as text ("" for an empty cell), at most 20 rows.

Nothing here depends on the language: headings are found by font size and weight, numbers by their shape, and
"Chapter 4" by a short list of words for chapter, part, section and appendix in several languages.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

import pymupdf

# Text extraction flags: ligatures spelled out (ﬁ -> fi), no image data (faster), whitespace kept.
FLAGS = pymupdf.TEXTFLAGS_DICT & ~pymupdf.TEXT_PRESERVE_LIGATURES & ~pymupdf.TEXT_PRESERVE_IMAGES
TOP_MARGIN = 0.15  # a first line starting above this share of the page height may be a header or page number
BOTTOM_MARGIN = 0.85  # a last line ending below it may be a footer or page number
PARAGRAPH_CHARS = 300
TABLE_ROWS = 20
NO_TEXT_LAYER = "no text layer: self-supervised labels need one"

_LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st", "\u00ad": ""})
_BOLD = re.compile(r"bold|black|heavy|demi|semibold|cmbx|cmb\d", re.IGNORECASE)
_MONO = re.compile(r"mono|courier|cmtt|consol|typewriter|code", re.IGNORECASE)
_ROMAN = re.compile(r"m{0,3}(?:cm|cd|d?c{0,3})(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3})")
_NUMBER = r"(\d{1,4}|[ivxlcdm]{1,7}|[IVXLCDM]{1,7})"
_PAGE_NUMBER = (
    re.compile(rf"^[-–—]?\s*{_NUMBER}\s*[-–—]?$"),
    re.compile(rf"^{_NUMBER}\s*/\s*\d{{1,4}}$"),
    re.compile(
        rf"^(?:page|p\.|pg\.|seite|s\.|pagina|página|pág\.|pag\.|strona|str\.|sida|side|sivu|стр\.|страница)\s*{_NUMBER}"
        r"(?:\s*(?:/|of|von|de|sur|di|z|av|из)\s*\d{1,4})?$",
        re.IGNORECASE,
    ),
)
_DIVISIONS = (
    "chapter|chapitre|kapitel|capítulo|capitulo|capitolo|hoofdstuk|rozdział|kapitola|luku|глава|section|sección|"
    "sezione|abschnitt|part|partie|teil|parte|deel|appendix|annexe|anhang|apéndice|appendice|bijlage|lesson|leçon|lektion"
)
_DIVISION_HEADING = re.compile(rf"^(?:{_DIVISIONS})\s+(\d{{1,3}}(?:\.\d{{1,3}})*|[IVXLCDM]{{1,6}}|[A-Z])\b", re.IGNORECASE)
_NUMBERED_HEADING = re.compile(r"^((?:\d{1,3}|[A-Z])(?:\.\d{1,3})+|\d{1,3})\.?(?=\s+\S|$)")
_URL = re.compile(r"://|^www\.|^/\w")
_SENTENCE_ENDS = tuple(".!?:;…)»”\"'。！？")
_DOT_LEADERS = re.compile(r"(?:\.\s?){4,}|…\s*\d+$")


def clean(text: str) -> str:
    """Whitespace collapsed (no-break spaces included), ligatures spelled out, soft hyphens dropped."""
    return " ".join(text.translate(_LIGATURES).split())


@dataclass
class Segment:
    """A run of text on one visual line: pymupdf lines side by side with no wide gap between them."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float
    size: float  # the font size most of its characters are set in
    bold: bool
    mono: bool
    block: int

    @property
    def letters(self) -> int:
        return sum(c.isalpha() for c in self.text)


@dataclass
class Row:
    """One visual line of the page: its segments left to right, and its pymupdf lines (a header and a page number
    side by side are two lines, however close)."""

    segments: list[Segment] = field(default_factory=list)
    lines: list[Segment] = field(default_factory=list)

    @property
    def y0(self) -> float:
        return min(s.y0 for s in self.segments)

    @property
    def y1(self) -> float:
        return max(s.y1 for s in self.segments)


def _dominant(spans: list[dict]) -> tuple[float, bool, bool]:
    sizes: Counter = Counter()
    bold = mono = total = 0
    for span in spans:
        n = len(span["text"].strip())
        total += n
        sizes[round(span["size"], 1)] += n
        bold += n * bool(span["flags"] & pymupdf.TEXT_FONT_BOLD or _BOLD.search(span["font"]))
        mono += n * bool(span["flags"] & pymupdf.TEXT_FONT_MONOSPACED or _MONO.search(span["font"]))
    size = sizes.most_common(1)[0][0] if sizes else 0.0
    return size, total > 0 and bold * 2 > total, total > 0 and mono * 2 > total


def _pieces(blocks: list[dict]) -> list[tuple[dict, int]]:
    """(pymupdf line, block number) for every line with text."""
    pieces = []
    for number, block in enumerate(blocks):
        if block.get("type") != 0:
            continue
        for line in block["lines"]:
            if any(span["text"].strip() for span in line["spans"]):
                pieces.append((line, number))
    return pieces


def text_blocks(page: pymupdf.Page, clip: pymupdf.Rect | None = None, sort: bool = False) -> list[dict]:
    """pymupdf's text blocks ("dict") in the coordinates of the page as it is shown and rendered (`page.rect`, clip
    too). pymupdf gives them on the unrotated page: on a page with /Rotate (a landscape table page) they are turned
    here, so that top, bottom, rows and reading order are those of the page image."""
    if not page.rotation:
        return page.get_text("dict", flags=FLAGS, clip=clip, sort=sort)["blocks"]
    unrotated = None if clip is None else pymupdf.Rect(clip) * page.derotation_matrix
    blocks = page.get_text("dict", flags=FLAGS, clip=unrotated)["blocks"]
    matrix = page.rotation_matrix
    for block in blocks:
        block["bbox"] = tuple(pymupdf.Rect(block["bbox"]) * matrix)
        for line in block.get("lines", []):
            line["bbox"] = tuple(pymupdf.Rect(line["bbox"]) * matrix)
            for span in line["spans"]:
                span["bbox"] = tuple(pymupdf.Rect(span["bbox"]) * matrix)
                span["origin"] = tuple(pymupdf.Point(span["origin"]) * matrix)
    return sorted(blocks, key=lambda block: (block["bbox"][1], block["bbox"][0])) if sort else blocks


def _baseline(line: dict) -> float:
    """Where the line's text sits: the baseline of its longest span (a superscript or a tall bracket does not move it)."""
    return max(line["spans"], key=lambda span: len(span["text"].strip()))["origin"][1]


def rows_of(pieces: list[tuple[dict, int]]) -> list[Row]:
    """Lines grouped into visual rows (one baseline), each row cut into segments at wide gaps."""
    ordered = sorted(pieces, key=lambda p: (_baseline(p[0]), p[0]["bbox"][0]))
    groups: list[list[tuple[dict, int]]] = []
    for piece in ordered:
        size = max(span["size"] for span in piece[0]["spans"])
        if groups and abs(_baseline(piece[0]) - _baseline(groups[-1][0][0])) <= 0.35 * size:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    rows = []
    for group in groups:
        row = Row()
        current: list[tuple[dict, int]] = []
        for piece in sorted(group, key=lambda p: p[0]["bbox"][0]):
            row.lines.append(_segment([piece]))
            if current:
                previous = current[-1][0]
                size = max(s["size"] for s in previous["spans"] + piece[0]["spans"])
                gap = piece[0]["bbox"][0] - previous["bbox"][2]
                if gap > 2.0 * size or piece[1] != current[-1][1]:  # another pymupdf block (a margin note) is apart
                    row.segments.append(_segment(current))
                    current = []
            current.append(piece)
        row.segments.append(_segment(current))
        rows.append(row)
    return [r for r in rows if any(s.text for s in r.segments)]


def _segment(pieces: list[tuple[dict, int]]) -> Segment:
    """Spans left to right as text: a space where two spans stand apart without one (pymupdf leaves it out)."""
    spans = [span for line, _ in pieces for span in line["spans"]]
    text = ""
    previous = None
    for span in spans:
        gap = span["bbox"][0] - previous["bbox"][2] if previous is not None else 0.0
        if previous is not None and gap > 0.15 * span["size"] and not text[-1:].isspace() and not span["text"][:1].isspace():
            text += " "
        text += span["text"]
        previous = span
    size, bold, mono = _dominant(spans)
    boxes = [line["bbox"] for line, _ in pieces]
    return Segment(
        clean(text),
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
        size,
        bold,
        mono,
        pieces[0][1],
    )


def page_number_in(text: str) -> str | None:
    """The number of a printed page number ("12", "iv", "Page 3 of 9" -> "3"), or None."""
    for pattern in _PAGE_NUMBER:
        match = pattern.match(text)
        if match and (match.group(1).isdigit() or _ROMAN.fullmatch(match.group(1).lower())):
            return match.group(1)
    return None


def header_key(text: str) -> str:
    """What stays the same in a running header from page to page: the text without digits, case or end punctuation."""
    return " ".join(re.sub(r"\d+", "", text).lower().split()).strip(" .:-–—|·•")


def _edge_rows(page: pymupdf.Page, rows: list[Row]) -> tuple[Row | None, Row | None]:
    """The first row when it lies in the top margin, the last when it lies in the bottom margin."""
    height = page.rect.height
    top = rows[0] if rows and rows[0].y0 < TOP_MARGIN * height else None
    bottom = rows[-1] if rows and rows[-1].y1 > BOTTOM_MARGIN * height and rows[-1] is not top else None
    return top, bottom


def margin_keys(page: pymupdf.Page) -> tuple[set[str], set[str]]:
    """Header keys of the page's top-margin row and bottom-margin row (page numbers aside): cheap, from the margins."""
    rect = page.rect
    keys = []
    for clip in (pymupdf.Rect(rect.x0, rect.y0, rect.x1, rect.y0 + TOP_MARGIN * rect.height),
                 pymupdf.Rect(rect.x0, rect.y0 + BOTTOM_MARGIN * rect.height, rect.x1, rect.y1)):  # fmt: skip
        rows = rows_of(_pieces(text_blocks(page, clip)))
        row = (rows[0] if clip.y0 == rect.y0 else rows[-1]) if rows else None
        found = set()
        for segment in row.lines if row else []:
            if page_number_in(segment.text) is None and segment.letters >= 2:
                found.add(header_key(segment.text))
        keys.append(found)
    return keys[0], keys[1]


@dataclass
class DocumentFurniture:
    """What a document repeats in its margins: the keys of its running headers and footers."""

    headers: Counter = field(default_factory=Counter)
    footers: Counter = field(default_factory=Counter)
    pages: int = 0  # pages with text in a margin row
    repeat: int = 3  # pages a key must be on to count as repeated
    has_headers: bool = False  # repeated headers on enough of its pages to call them running headers

    @classmethod
    def of(cls, doc: pymupdf.Document) -> DocumentFurniture:
        furniture = cls()
        tops = []
        for page in doc:
            try:
                top, bottom = margin_keys(page)
            except Exception:  # a page that cannot be read is reported where it is labeled
                continue
            furniture.headers.update(top)
            furniture.footers.update(bottom)
            furniture.pages += bool(top or bottom)
            tops.append(top)
        furniture.repeat = 3 if furniture.pages >= 10 else 2
        covered = sum(any(furniture.headers[key] >= furniture.repeat for key in top) for top in tops)
        furniture.has_headers = covered >= 0.3 * max(furniture.pages, 1)
        return furniture

    def repeated_header(self, text: str) -> bool:
        return self.headers[header_key(text)] >= self.repeat

    def repeated_footer(self, text: str) -> bool:
        return self.footers[header_key(text)] >= self.repeat


def _apart(line: Segment, row: Row) -> bool:
    """The line is the first or last of its row, at least three font sizes from the next."""
    if line is row.lines[0] and len(row.lines) > 1:
        return row.lines[1].x0 - line.x1 > 3 * line.size
    if line is row.lines[-1] and len(row.lines) > 1:
        return line.x0 - row.lines[-2].x1 > 3 * line.size
    return False


def _separated(row: Row, rows: list[Row]) -> bool:
    """A blank space wider than a line's height between the first (or last) row and the page's text."""
    index = rows.index(row)
    neighbour = rows[index + 1] if index == 0 else rows[index - 1]
    gap = neighbour.y0 - row.y1 if index == 0 else row.y0 - neighbour.y1
    return len(rows) == 1 or gap > 0.8 * (row.y1 - row.y0)


def _alone(row: Row, rows: list[Row]) -> bool:
    """No other row shares a pymupdf block with this one."""
    blocks = {s.block for s in row.segments}
    return not any(s.block in blocks for other in rows if other is not row for s in other.segments)


def _body_size(rows: list[Row]) -> float:
    """The size most of the page's prose is set in (code listings aside: they are often smaller)."""
    sizes: Counter = Counter()
    for mono in (False, True):
        for row in rows:
            for segment in row.segments:
                if segment.mono == mono:
                    sizes[segment.size] += len(segment.text)
        if sizes:
            break
    return sizes.most_common(1)[0][0] if sizes else 0.0


def _is_heading(segment: Segment, row: Row, body: float) -> bool:
    if segment.mono or segment.letters < 2 or len(segment.text.split()) > 20 or _DOT_LEADERS.search(segment.text):
        return False
    if segment.size >= body * 1.08:
        return True
    own_line = len(row.segments) == 1 and len(segment.text.split()) <= 15
    return segment.bold and own_line and segment.size >= body * 0.98


def section_number(text: str) -> str | None:
    match = _DIVISION_HEADING.match(text) or _NUMBERED_HEADING.match(text)
    return match.group(1) if match else None


def join_lines(lines: list[str]) -> str:
    """Lines of a paragraph as one text; a word broken with a hyphen at a line end is joined."""
    text = ""
    for line in lines:
        last_word = text.rsplit(" ", 1)[-1]
        if text.endswith("-") and len(text) > 1 and text[-2].isalpha() and line[:1].islower():
            text = text[:-1] + line
        elif _URL.search(last_word) and last_word.endswith(("/", ".", "-", "_", "#", "?", "=", "&")):
            text += line  # a web address broken at the line end
        else:
            text = f"{text} {line}" if text else line
    return clean(text)


def cut(text: str, limit: int = PARAGRAPH_CHARS) -> str:
    if len(text) <= limit:
        return text
    space = text.rfind(" ", 0, limit + 1)
    return text[:space].rstrip() if space > 0 else text[:limit]


def _table_rows(page: pymupdf.Page) -> tuple[list[list[str]], list[tuple[float, float, float, float]]]:
    """Rows of the first table with text, and the boxes of every table found (kept out of the first paragraph)."""
    try:
        tables = page.find_tables().tables
    except Exception:  # pymupdf's table finder failing on an odd page costs that field only
        return [], []
    first: list[list[str]] | None = None  # the first table with text decides, kept or not
    boxes = []
    printed = clean(page.get_text())
    for table in tables:
        boxes.append(tuple(table.bbox))
        if first is not None:
            continue
        rows = [[clean(cell or "") for cell in row] for row in table.extract()]
        if any(cell for row in rows for cell in row):
            first = rows[:TABLE_ROWS] if as_printed(rows, printed) else []
    return first or [], boxes


def as_printed(rows: list[list[str]], page_text: str, share: float = 0.9) -> bool:
    """Whether the table finder read the cells as the page prints them: at least `share` of the non-empty cells occur
    in the page's own text. Spaced-out letters ("Ab out" for "About", from glyphs drawn apart) or cells cut
    mid-word would teach the model text the image does not show: such a table is labeled as none."""
    cells = [cell for row in rows for cell in row if cell]
    return sum(cell in page_text for cell in cells) >= share * len(cells)


def _inside(segment: Segment, boxes: list[tuple[float, float, float, float]]) -> bool:
    for x0, y0, x1, y1 in boxes:
        width = min(segment.x1, x1) - max(segment.x0, x0)
        height = min(segment.y1, y1) - max(segment.y0, y0)
        area = max((segment.x1 - segment.x0) * (segment.y1 - segment.y0), 1e-6)
        if width > 0 and height > 0 and width * height >= 0.3 * area:
            return True
    return False


def _body_share(members: list[tuple[Row, Segment]], tables, body: float) -> float:
    """The share of a block's characters set as body text (body size, not code, not in a table)."""
    chars = sum(len(s.text) for _, s in members)
    good = sum(len(s.text) for _, s in members if not s.mono and body * 0.92 <= s.size < body * 1.08 and not _inside(s, tables))
    return good / chars if chars else 0.0


_ITEM = re.compile(r"^(?:[•◦▪‣∙·*–—-]|\(?\d{1,2}[.)])\s")


def _first_of(members: list[tuple[Row, Segment]], body: float) -> tuple[list[str], bool]:
    """The lines of the block's first paragraph, and whether that is the whole block. A new paragraph starts after a
    sentence's end at an indented line or after a short line, or at a list item."""
    left = min(s.x0 for _, s in members)
    right = max(s.x1 for _, s in members)
    lines = [members[0][1].text]
    for previous, (_, segment) in itertools.pairwise(members):
        ended = lines[-1].endswith(_SENTENCE_ENDS)
        indented = segment.x0 > left + 0.8 * body
        short = previous[1].x1 < right - 3 * body  # the last line of a paragraph stops short of the right edge
        if (ended and (indented or short)) or _ITEM.match(segment.text):
            return lines, False
        lines.append(segment.text)
    return lines, True


def _first_paragraph(rows: list[Row], furniture_rows: set[int], tables, body: float) -> str | None:
    """The first paragraph of body text: pymupdf blocks mostly of body text, heading lines aside; a paragraph a block
    boundary cuts (a font change, a link) goes on into the block right below."""
    by_block: dict[int, list[tuple[Row, Segment]]] = {}
    for index, row in enumerate(rows):
        if index not in furniture_rows:
            for segment in row.segments:
                by_block.setdefault(segment.block, []).append((row, segment))
    blocks = []
    for members in by_block.values():
        while members and (members[0][1].mono or _is_heading(members[0][1], members[0][0], body)):
            members = members[1:]  # a heading or a code line above the paragraph, in the same pymupdf block
        if members:
            blocks.append(members)
    for position, members in enumerate(blocks):
        if _body_share(members, tables, body) < 0.5 or any(_DOT_LEADERS.search(s.text) for _, s in members):
            continue
        lines, whole = _first_of(members, body)
        last, left = members[-1][1], min(seg.x0 for _, seg in members)
        for following in blocks[position + 1 :]:
            if not whole or lines[-1].endswith(_SENTENCE_ENDS) or following[0][1].y0 - last.y1 > 0.8 * body:
                break
            sizes = [seg.size for _, seg in following]
            if not all(body * 0.92 <= size < body * 1.08 for size in sizes) or abs(following[0][1].x0 - left) > 2 * body:
                break  # not the same paragraph's text (a code line or a URL in it may be in another font)
            more, whole = _first_of(following, body)
            lines += more
            last = following[-1][1]
        text = join_lines(lines)
        chars = text.replace(" ", "")
        prose = len(text) > PARAGRAPH_CHARS or text.endswith(_SENTENCE_ENDS)  # not a grammar rule, a label or a formula
        if prose and len(text.split()) >= 6 and sum(c.isalpha() for c in chars) >= 0.6 * len(chars):
            return cut(text)
    return None


def page_fields(page: pymupdf.Page, furniture: DocumentFurniture) -> tuple[dict | None, str]:
    """The page's self-supervised fields, or (None, why not)."""
    if not page.get_text("text", flags=FLAGS).strip():
        return None, NO_TEXT_LAYER
    rows = rows_of(_pieces(text_blocks(page, sort=True)))
    if not rows:
        return None, NO_TEXT_LAYER
    body = _body_size(rows)
    top, bottom = _edge_rows(page, rows)

    page_number = running_header = None
    furniture_rows: set[int] = set()
    edges = ((top, furniture.repeated_header, furniture.headers), (bottom, furniture.repeated_footer, furniture.footers))
    for row, repeated, counts in edges:
        if row is None:
            continue
        numbers = [(s, page_number_in(s.text)) for s in row.lines if s.size <= body * 1.3 and page_number_in(s.text)]
        headers = [s for s in row.lines if s.letters >= 2 and repeated(s.text)]
        if len(numbers) + len(headers) < len(row.lines):
            # Beside other text, a number is a page number only in a document with running headers (footers) there, at
            # either end of the line, standing well apart, on a line set off from the page's text (not a code line
            # number, a table cell or a table of contents entry).
            furnished = any(n >= furniture.repeat for n in counts.values())  # the document repeats text at this edge
            numbers = [(s, n) for s, n in numbers if furnished and _apart(s, row) and _separated(row, rows)]
        if numbers and page_number is None:
            page_number = numbers[0][1]
        if row is top and headers and furniture.has_headers:
            running_header = max(headers, key=lambda s: (counts[header_key(s.text)], len(s.text))).text
        heading = any(_is_heading(s, row, body) for s in row.segments)
        if numbers or headers or (row is top and not heading and _alone(row, rows)):
            furniture_rows.add(rows.index(row))  # a top line with a block of its own is page furniture, not a paragraph

    title = section = None
    best: tuple[float, int, int] | None = None
    for index, row in enumerate(rows):
        if index in furniture_rows:
            continue
        for position, segment in enumerate(row.segments):
            if not _is_heading(segment, row, body):
                continue
            if section is None:
                section = section_number(segment.text)
            if best is None or segment.size > best[0] + 0.05:
                best = (segment.size, index, position)
    if best is not None:
        size, index, position = best
        heading = rows[index].segments[position]
        parts = [heading.text]
        for following in rows[index + 1 : index + 3]:  # a heading wrapped onto the next line(s)
            (segment,) = following.segments if len(following.segments) == 1 else (None,)
            if (
                segment is None
                or segment.block != heading.block
                or abs(segment.size - size) > 0.05
                or segment.bold != heading.bold
                or segment.y0 - rows[index + len(parts) - 1].y1 > 0.8 * size
            ):
                break
            parts.append(segment.text)
        title = clean(" ".join(parts)).lstrip("•◦▪▸►‣∙·*–— ") or None

    table_rows, tables = _table_rows(page)
    fields = {
        "title": title,
        "section": section,
        "running_header": running_header,
        "page_number": page_number,
        "first_paragraph": _first_paragraph(rows, furniture_rows, tables, body),
        "table_rows": table_rows,
    }
    if not any(fields.values()):
        return None, "no usable field: no heading, header, page number, paragraph or table found in the text layer"
    return fields, ""
