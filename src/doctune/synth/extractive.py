"""The extractive teacher: deterministic questions built from a chunk's own content, answers are its spans.

Question types, each with five phrasings: definitions, what a command/option/function does, list items,
numeric facts, section topics. Every answer is `chunk_text[start:end]` (whitespace folded in the record).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

TEMPLATES: dict[str, list[str]] = {
    "definition": [
        "What is {term}?",
        "How does the documentation define {term}?",
        "What does the term {term} refer to?",
        "Give the definition of {term} according to the manual.",
        "In the context of {topic}, what is {term}?",
    ],
    "command": [
        "What does the {name} {kind} do?",
        "What is the purpose of the {name} {kind}?",
        "Describe the effect of the {name} {kind}.",
        "What is the {name} {kind} used for?",
        "Explain what the {name} {kind} does.",
    ],
    "list": [
        'What items are listed under "{intro}"?',
        "List the entries the documentation gives for: {intro}",
        'Which elements does the manual enumerate for "{intro}"?',
        'What are the points listed after "{intro}"?',
        'Name the items given under "{intro}".',
    ],
    "numeric": [
        'Fill in the number: "{masked}"',
        'What value completes this statement from the manual: "{masked}"',
        'According to the documentation, which number belongs in "{masked}"?',
        'What is the missing figure in "{masked}"?',
        'Which number does the manual give here: "{masked}"?',
    ],
    "section": [
        'What does the section "{section}" cover?',
        'Summarize what the section "{section}" explains.',
        'What is explained under "{section}"?',
        'What is the section "{section}" about?',
        'Describe the content of the "{section}" section.',
    ],
}

_SENTENCE = re.compile(r"[A-Z](?:[^.!?]|[.!?](?!\s|$))*?[.!?](?=\s|$)", re.S)
_DEFINITION = re.compile(
    r"^(?P<term>(?:(?:The|An?)\s+)?[A-Za-z][\w\-\\]*(?:\s+[\w\-\\]+){0,3})\s+(?:is|are|refers to|means|denotes)\s+"
    r"(?P<rest>(?:an?|the|used|one|a set|called)\b.{8,})$",
    re.S,
)
_COMMAND = re.compile(
    r"^(?:The\s+)?(?P<name>[\\`'\"]?[\w\\.@-]{2,40}[`'\"]?)\s+(?P<kind>command|option|function|macro|environment|keyword|switch|"
    r"directive|variable|package)\s+(?P<rest>(?:is|can|will|does|makes|sets|prints|draws|reads|writes|allows|lets|takes|"
    r"returns|specifies|controls|tells|causes|may|must|should|has)\b.{8,})$",
    re.S,
)
_OPTION_LINE = re.compile(r"^(?P<name>--?[A-Za-z][\w-]*)(?:[ =](?P<arg>[\w<>\[\].-]+))?\s*(?:--|—|:|\s{2,})\s*(?P<desc>\S.{9,})$")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)?)(?![\w]|\.\d)")
_NOT_NAMES = {"this", "that", "the", "a", "an", "each", "every", "any", "which", "its", "their", "such", "same", "new", "first"}
_BULLET = re.compile(r"^(?:[-*•·◦‣]|\d{1,2}[.)]|[a-z][.)])\s+\S")


@dataclass
class QA:
    question: str
    answer: str
    chunk_id: str
    qtype: str
    template: int = -1  # index into TEMPLATES[qtype]; -1 for LLM teachers
    answer_start: int = -1  # offset into the chunk text; -1 when not an exact span
    answer_end: int = -1
    evidence: str = ""  # the chunk span the item rests on (contamination checks)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "chunk_id": self.chunk_id,
            "qtype": self.qtype,
            "template": self.template,
            "answer_start": self.answer_start,
            "answer_end": self.answer_end,
            "evidence": self.evidence,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QA:
        return cls(**data)


def fold(text: str) -> str:
    return " ".join(text.split())


def _pick(chunk_id: str, qtype: str, salt: str) -> int:
    digest = hashlib.sha256(f"{chunk_id}|{qtype}|{salt}".encode()).digest()
    return digest[0] % len(TEMPLATES[qtype])


def _prose(sentence: str) -> bool:
    letters = sum(c.isalpha() for c in sentence)
    return 30 <= len(sentence) <= 400 and letters >= 0.6 * len(sentence) and "\\" not in sentence[:3]


def sentences(text: str) -> list[tuple[int, int]]:
    """Spans of prose sentences: they may wrap over line breaks, never over a blank line, and start where a
    sentence starts (chunk or paragraph start, or after . ! ? :), not after a heading line."""
    spans = []
    for paragraph in re.finditer(r"[^\n]+(?:\n[^\n]+)*", text):
        base = paragraph.start()
        para = paragraph.group(0)
        for match in _SENTENCE.finditer(para):
            start, end = base + match.start(), base + match.end()
            # A short first line without punctuation is a heading glued on by the line break: skip it.
            while "\n" in text[start:end]:
                first, rest = text[start:end].split("\n", 1)
                if len(first) >= 50 or first.rstrip()[-1:] in ".!?:,;" or not rest[:1].isupper():
                    break
                start += len(first) + 1
            before = text[base:start].rstrip()
            if before and before[-1] not in ".!?:":
                continue  # starts mid-sentence (a chunk edge or a wrapped line)
            if not _prose(fold(text[start:end])):
                continue
            spans.append((start, end))
    return spans


def _qa(chunk: dict, qtype: str, fields: dict, start: int, end: int, salt: str, answer: str | None = None) -> QA:
    template = _pick(chunk["chunk_id"], qtype, salt)
    text = chunk["text"]
    return QA(
        question=TEMPLATES[qtype][template].format(**fields),
        answer=answer if answer is not None else fold(text[start:end]),
        chunk_id=chunk["chunk_id"],
        qtype=qtype,
        template=template,
        answer_start=start,
        answer_end=end,
        evidence=fold(text[start:end]),
        meta={"fields": {k: v for k, v in fields.items() if k != "topic"}},
    )


def _definitions(chunk: dict, spans: list[tuple[int, int]]) -> list[QA]:
    out = []
    topic = chunk.get("section") or "this documentation"
    for start, end in spans:
        match = _DEFINITION.match(fold(chunk["text"][start:end]))
        pronoun = match and match.group("term").lower().startswith(("this", "it ", "there", "that", "which", "these"))
        if match and not pronoun and not match.group("rest").startswith("the same"):
            term = re.sub(r"^(?:The|An?)\s+", "", match.group("term"))
            out.append(_qa(chunk, "definition", {"term": term, "topic": topic}, start, end, term))
    return out


def _commands(chunk: dict, spans: list[tuple[int, int]]) -> list[QA]:
    out = []
    text = chunk["text"]
    for start, end in spans:
        match = _COMMAND.match(fold(text[start:end]))
        if match and match.group("name").lower() not in _NOT_NAMES:
            name, kind = match.group("name").strip("`'\""), match.group("kind")
            out.append(_qa(chunk, "command", {"name": name, "kind": kind}, start, end, name))
    offset = 0
    for line in text.split("\n"):
        match = _OPTION_LINE.match(line.strip())
        if match:
            lead = len(line) - len(line.lstrip())
            desc_start = offset + lead + match.start("desc")
            desc_end = offset + lead + match.end("desc")
            name = match.group("name")
            out.append(_qa(chunk, "command", {"name": name, "kind": "option"}, desc_start, desc_end, name))
        offset += len(line) + 1
    return out


def _lists(chunk: dict) -> list[QA]:
    out = []
    text = chunk["text"]
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    i = 0
    while i < len(lines):
        intro = lines[i].strip()
        if intro.endswith(":") and 10 <= len(intro) <= 150 and not _BULLET.match(intro):
            j = i + 1
            while (
                j < len(lines)
                and (item := lines[j].strip())
                and not item.endswith(":")
                and (_BULLET.match(item) or len(item) <= 60)
            ):
                j += 1
            if j - (i + 1) >= 2:
                start, end = starts[i + 1], starts[j] - 1
                fields = {"intro": fold(intro.rstrip(":"))}
                out.append(_qa(chunk, "list", fields, start, end, intro, answer="\n".join(x.strip() for x in lines[i + 1 : j])))
                i = j
                continue
        i += 1
    return out


def _numbers(chunk: dict, spans: list[tuple[int, int]]) -> list[QA]:
    out = []
    text = chunk["text"]
    for start, end in spans:
        sentence = text[start:end]
        numbers = list(_NUMBER.finditer(sentence))
        if len(numbers) != 1:  # one number: the question has exactly one answer
            continue
        m = numbers[0]
        masked = fold(sentence[: m.start()] + "___" + sentence[m.end() :])
        qa = _qa(chunk, "numeric", {"masked": masked}, start + m.start(), start + m.end(), masked)
        qa.evidence = fold(sentence)
        out.append(qa)
    return out


def _section(chunk: dict, spans: list[tuple[int, int]]) -> list[QA]:
    section = chunk.get("section") or ""
    title = re.sub(r"^[\d.]+\s+", "", section)
    if not spans or len(title) < 4:
        return []
    start, end = spans[0]
    return [_qa(chunk, "section", {"section": title}, start, end, title)]


def extractive_questions(chunk: dict, limit: int) -> list[QA]:
    """Up to `limit` questions for one chunk, types interleaved so a chunk yields a mix."""
    spans = sentences(chunk["text"])
    by_type = [
        _definitions(chunk, spans),
        _commands(chunk, spans),
        _lists(chunk),
        _numbers(chunk, spans),
        _section(chunk, spans),
    ]
    out: list[QA] = []
    seen: set[str] = set()
    round_ = 0
    while len(out) < limit and any(round_ < len(items) for items in by_type):
        for items in by_type:
            if round_ < len(items) and len(out) < limit and items[round_].question not in seen:
                seen.add(items[round_].question)
                out.append(items[round_])
        round_ += 1
    return out
