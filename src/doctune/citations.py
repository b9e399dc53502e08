"""Citations as every stage writes and reads them.

A RAG prompt numbers its passages and labels each with where a reader finds it, in the document's language
(`[2] Pump manual, p. 12`); a cited answer ends with the numbers of the passages it rests on (`... 40 psi. [2]`).
Synth writes the training answers so, the gate scores what a model cites against the passages that hold the
answer, serving returns the cited passages as data.
"""

from __future__ import annotations

import re
from pathlib import PurePath

# The run of markers an answer ends with, before a final stop if any: `... 40 psi. [2]`, `... 40 psi [1][3].`.
# Brackets elsewhere are the documents' own text (`x[1]`, a reference list) and stay.
_TRAILING = re.compile(r"((?:\s*\[[0-9]{1,3}\])+)(\s*[.!?。]?\s*)$")
_NUMBER = re.compile(r"\[([0-9]{1,3})\]")
MIN_SUPPORT_CHARS = 24  # an evidence span shorter than this ("Yes", "40") is found by chance in unrelated text
_GENERATED_TITLES = re.compile(
    r"^(microsoft (word|powerpoint|excel) -|untitled( document)?$|document\d*$|presentation\d*$|"
    r"powerpoint presentation$|slide \d+$)|\.(docx?|pptx?|xlsx?|rtf|odt|pdf|tex|dvi)$",
    re.IGNORECASE,
)


def document_title(metadata_title: str, source: str) -> str:
    """The title a reader knows a document by: its own (PDF metadata) where it states one, else its file name."""
    title = " ".join((metadata_title or "").split())
    if title and not _GENERATED_TITLES.search(title) and len(title) <= 160:
        return title
    return file_title(source)


def file_title(source: str) -> str:
    return PurePath(source).stem.replace("_", " ") or source


# (one page, a page range) in the document's language (ISO 639-1, as ingest detects it); English's elsewhere.
PAGE_ABBREVIATIONS = {
    "en": ("p.", "pp."),
    "de": ("S.", "S."),
    "es": ("pág.", "págs."),
    "fr": ("p.", "p."),
    "it": ("p.", "pp."),
    "pt": ("p.", "pp."),
    "nl": ("p.", "pp."),
    "pl": ("s.", "s."),
    "cs": ("s.", "s."),
    "sv": ("s.", "s."),
    "da": ("s.", "s."),
    "no": ("s.", "s."),
    "ru": ("с.", "с."),
}


def source_label(title: str, page_start: int | None, page_end: int | None, lang: str = "en") -> str:
    """`Title, p. 12` or `Title, pp. 12–13` (`S. 12` in German, `págs. 12–13` in Spanish); the title alone where the
    pages are unknown."""
    if not page_start:
        return title
    one, many = PAGE_ABBREVIATIONS.get(lang, PAGE_ABBREVIATIONS["en"])
    pages = f"{one} {page_start}" if not page_end or page_end == page_start else f"{many} {page_start}–{page_end}"
    return f"{title}, {pages}" if title else pages


def chunk_label(chunk: dict) -> str:
    """A chunk's source label, in its document's language; chunks ingested before titles existed fall back to their
    file name where known, else no label (a document digest would tell a reader nothing)."""
    title = chunk.get("title") or (file_title(chunk["source"]) if chunk.get("source") else "")
    lang = chunk.get("label_lang") or chunk.get("lang") or "en"
    return source_label(title, chunk.get("page_start"), chunk.get("page_end"), lang) if title else ""


def chunk_passage(chunk: dict) -> str:
    """A chunk as a RAG prompt shows it: its label on the first line, then its text."""
    label = chunk_label(chunk)
    return f"{label}\n{chunk['text']}" if label else chunk["text"]


def citation_suffix(numbers: list[int]) -> str:
    """What a cited answer ends with: ` [2]`, ` [1][4]`; nothing for no citation."""
    return (" " + "".join(f"[{n}]" for n in sorted(set(numbers)))) if numbers else ""


def cite(answer: str, numbers: list[int]) -> str:
    return answer.rstrip() + citation_suffix(numbers)


def cited_numbers(reply: str, passages: int) -> set[int]:
    """The passage numbers a reply cites in the markers it ends with, among the `passages` its prompt carried."""
    found = _TRAILING.search(reply)
    numbers = (int(n) for n in _NUMBER.findall(found.group(1))) if found else ()
    return {n for n in numbers if 1 <= n <= passages}


def strip_citations(text: str) -> str:
    """The answer without the citation markers it ends with: what answer overlap (F1, exact match, ROUGE) is scored
    on, and what the flywheel compares."""
    return _TRAILING.sub(r"\2", text).strip()


def cited_but_not_shown(messages: list[dict], replies: list[str]) -> list[int]:
    """Passage numbers the replies cite whose `[n] ` label the last user turn does not show (a prompt cut to fit
    max_length can lose one: an answer citing it would teach citing what is not there)."""
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    cited = set().union(*(cited_numbers(reply, 999) for reply in replies))
    return sorted(n for n in cited if not re.search(rf"(?m)^\[{n}\] ", user))


def supports(passage_text: str, evidence: str) -> bool:
    """Whether a passage holds an answer's evidence span (whitespace- and case-insensitive); spans too short to
    identify a passage never count."""
    span = " ".join(evidence.split()).lower()
    return len(span) >= MIN_SUPPORT_CHARS and span in " ".join(passage_text.split()).lower()


def supporting_passages(context_ids: list[str], texts: list[str], source_ids: list[str], evidence: str) -> list[int]:
    """1-based numbers of the passages that hold the answer: its source chunk(s), and any other passage that
    carries the same evidence (a duplicated paragraph)."""
    sources = set(source_ids)
    return [n for n, (cid, text) in enumerate(zip(context_ids, texts), start=1) if cid in sources or supports(text, evidence)]
