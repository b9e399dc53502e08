"""The extractive teacher: deterministic questions built from the structures documentation has, answered by spans.

Question types (five phrasings each, per language in languages.py): definitions ("X is a ..."), reference entries
(a command/option/function sentence, `name — description` and option lines), procedures (numbered steps), lists
under an introducing line, notes and warnings, numeric facts ("The default depth is 8." asks for the default depth
and answers with the sentence), and a titled section's lead sentences. Every question names its subject (a term,
an entry, a section title); subjects that are pronouns, markup or generic titles ("Example 1") are refused. Every
answer is a complete phrase or sentence, `chunk_text[start:end]` (whitespace folded in the record).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from doctune.synth.languages import Language, language

_UPPER = "A-ZÀ-ÖØ-ÞĀ-Ž"
_SENTENCE = re.compile(rf"[{_UPPER}¿¡](?:[^.!?]|[.!?](?!\s|$))*?[.!?](?=\s|$)", re.S)
_NUMBER = re.compile(r"(?<![\w.,-])(\d+(?:[.,]\d+)?)(?![\w-]|[.,]\d)")
_REFERENCE_TO_PAGES = re.compile(r"\b(?:page|pages|p\.|section|chapter|figure|table|seite|kapitel|abschnitt|abbildung|"
                                 r"chapitre|tableau|página|capítulo|sección|tabla)\s*\d", re.I)  # fmt: skip
_MARKUP = re.compile(r"[<>{}\[\]=\\$;|@#^~]|___|\.\s?\.\s?\.|://")
_STEP = re.compile(r"^(?:(?:step|étape|schritt|paso)\s+(\d{1,2})[.:)]?|(\d{1,2})[.)])\s+(\S.*)$", re.I)
_BULLET = re.compile(r"^(?:[-*•·◦‣–]|\d{1,2}[.)]|[a-z][.)])\s+\S")
_NUMBERING = re.compile(r"^(?:[\dIVXivx]+[.)]?)+(?:\s+|$)")
_ENTRY = re.compile(
    r"^(?P<name>--?[A-Za-z][\w-]*(?:[ =][<\[]?[\w.-]+[>\]]?)?|[a-z_][\w.-]*[._-][\w.-]*|[a-z][a-z0-9_]{2,30})"
    r"\s*(?:—|–|--|:|\t|\s{2,})\s*(?P<desc>\S.{14,})$"
)


@dataclass
class QA:
    question: str
    answer: str
    chunk_id: str
    qtype: str
    template: int = -1  # index into the language's templates[qtype]; -1 for LLM teachers
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


def _pick(chunk_id: str, qtype: str, salt: str, choices: int) -> int:
    digest = hashlib.sha256(f"{chunk_id}|{qtype}|{salt}".encode()).digest()
    return digest[0] % choices


def _letters_share(text: str) -> float:
    return sum(c.isalpha() for c in text) / max(1, len(text))


def _prose(sentence: str) -> bool:
    return 30 <= len(sentence) <= 400 and _letters_share(sentence) >= 0.6 and "\\" not in sentence[:3]


def names_something(phrase: str, lang: Language) -> bool:
    """A subject a question can be asked about: not a pronoun, not markup, not a fragment of punctuation."""
    words = phrase.split()
    if not words or len(phrase) > 80 or _MARKUP.search(phrase):
        return False
    first = words[0].lower().strip("«»\"'“”„")
    if first in lang.pronouns or first.rstrip("'’") in lang.pronouns:
        return False
    bare = [w for w in words if w.lower() not in lang.articles]
    if len(bare) == 2 and bare[0].lower() in lang.positional and re.fullmatch(r"[\d.\-–]+", bare[1]):
        return False  # "line 3", "la línea 10": a place in a listing the question does not show
    return _letters_share(phrase) >= 0.5


def section_title(chunk: dict, lang: Language) -> str:
    """The chunk's section title when it names a subject ("Installing packages"), else "" ("Example 1",
    "Contents", "4.2", a table-of-contents line)."""
    title = fold(_NUMBERING.sub("", fold(chunk.get("section") or "")))
    bare = re.sub(r"[\s\d.:()-]+$", "", title).lower()
    if len(title) < 4 or len(title) > 90 or _letters_share(title) < 0.6 or _MARKUP.search(title) or title.endswith("?"):
        return ""
    if bare in lang.generic_titles or any(bare.startswith(g + " ") and len(bare.split()) <= 3 for g in lang.generic_titles):
        return ""
    return title if names_something(title, lang) else ""


SECTION_PATH = " › "  # "/bin : Essential user command binaries › Purpose"


def section_key(section: str) -> str:
    """A heading as questions compare it: numbering off, folded, lower case."""
    return fold(_NUMBERING.sub("", fold(section or ""))).lower()


def name_sections(chunks: list[dict]) -> list[dict]:
    """The chunks, each with `section_named`: how a question names its section. A title that names one section of
    the corpus names it alone; a title that several sections share ("Purpose" under every directory of a standard,
    "Options" under every command) is prefixed with its parent heading, else its document's title, else both,
    whichever tells it apart as a reader sees it; where none does, questions cannot name it and it is "" (no
    question about that section)."""

    def key(c: dict) -> tuple[str, str, str]:
        return c["doc_id"], c.get("section") or "", c.get("section_parent") or ""

    def qualifiers(c: dict, lang: Language) -> list[str]:
        parent = section_title({"section": c.get("section_parent") or ""}, lang)
        title = fold(c.get("title") or "")
        return [parent, title, f"{title}{SECTION_PATH}{parent}" if title and parent else ""]

    first: dict[tuple, dict] = {}  # one chunk per distinct section
    for c in chunks:
        if section_key(c.get("section", "")):
            first.setdefault(key(c), c)
    alike = Counter(section_key(k[1]) for k in first)
    shown: Counter = Counter()  # (title, qualifier as a reader sees it) over the distinct sections
    for k, c in first.items():
        lang = language(c.get("lang") or "en")
        if lang and alike[section_key(k[1])] > 1:
            shown.update({(section_key(k[1]), i, q.lower()) for i, q in enumerate(qualifiers(c, lang)) if q})
    out = []
    for c in chunks:
        lang = language(c.get("lang") or "en")
        own = section_title(c, lang) if lang else ""
        named = own
        if own and alike[section_key(c["section"])] > 1:
            unique = [q for i, q in enumerate(qualifiers(c, lang)) if q and shown[(section_key(c["section"]), i, q.lower())] == 1]
            named = f"{unique[0]}{SECTION_PATH}{own}" if unique else ""
        out.append({**c, "section_named": named})
    return out


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


class _Chunk:
    """One chunk seen by the extractors: its text, language, title and prose sentences."""

    def __init__(self, chunk: dict, lang: Language):
        self.chunk, self.lang = chunk, lang
        self.text = chunk["text"]
        self.heading = section_title(chunk, lang)  # as the text shows it
        self.title = chunk.get("section_named", self.heading) if self.heading else ""  # as a question names it
        self.spans = sentences(self.text)
        self.lines = self.text.split("\n")
        self.line_starts = [0]
        for line in self.lines:
            self.line_starts.append(self.line_starts[-1] + len(line) + 1)

    def qa(self, qtype: str, fields: dict, start: int, end: int, salt: str, answer: str | None = None) -> QA:
        phrasings = self.lang.templates[qtype]
        template = _pick(self.chunk["chunk_id"], qtype, salt, len(phrasings))
        if "{title}" in phrasings[template] and not fields.get("title"):
            template = next(i for i, p in enumerate(phrasings) if "{title}" not in p)
        span = fold(self.text[start:end])
        return QA(
            question=self.lang.contract(phrasings[template].format(**fields)),
            answer=answer if answer is not None else span,
            chunk_id=self.chunk["chunk_id"],
            qtype=qtype,
            template=template,
            answer_start=start,
            answer_end=end,
            evidence=span,
            meta={"fields": fields, "lang": self.lang.code},
        )


def _alternatives(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _recurs(word: str, text: str, start: int) -> bool:
    """Whether a sentence-initial word also stands inside a sentence, spelt the same (a name: "Debian", "Aptitude"),
    rather than only at sentence starts (an adverb: "Manchmal", "Sometimes")."""
    return any(m.start() != start for m in re.finditer(rf"(?<=[\w,;(] ){re.escape(word)}\b", text))


def _definitions(c: _Chunk) -> list[QA]:
    lang = c.lang
    articles = _alternatives(lang.articles)
    pattern = re.compile(
        rf"^(?P<term>(?:(?:{articles})\s+|l')?[^\W\d_][\w\-’']*(?:\s+[\w\-’']+){{0,3}})\s+(?:{_alternatives(lang.copulas)})\s+"
        rf"(?P<rest>(?:{articles}|used|utilisé|verwendet|usado)\b.{{8,}})$",
        re.S | re.I,
    )
    out = []
    for start, end in c.spans:
        match = pattern.match(fold(c.text[start:end]))
        if not match:
            continue
        term = match.group("term")  # with its article: "What is a box plot?", "Qu'est-ce que le noyau ?"
        first, _, rest = term.partition(" ")
        named = rest if first.lower() in lang.articles and rest else term.removeprefix("l'").removeprefix("L'")
        if (
            not names_something(named, lang)
            or (named == term and " " not in term and not _recurs(term, c.text, start))
            or any(w.lower() in lang.pronouns for w in named.split()[1:])
            or match.group("rest").lower().startswith(("the same", "le même", "la même"))
        ):
            continue
        term = term[0].lower() + term[1:] if named != term else term  # the article, lower-cased mid-question
        out.append(c.qa("definition", {"term": term, "title": c.title}, start, end, term))
    return out


def _kind_of(word: str, lang: Language) -> str | None:
    return lang.kinds.get(word.lower())


_NOT_ENTRIES = {
    "following",
    "above",
    "below",
    "same",
    "new",
    "previous",
    "next",
    "suivante",
    "suivant",
    "précédente",
    "folgende",
    "folgenden",
    "obige",
    "siguiente",
    "anterior",
}


def _names_an_entry(name: str, lang: Language) -> bool:
    """A command/option name: code-like (`\\foo`, `--bar`, `a.b`, `x_y`) or a short lower-case word that is not a
    pronoun, article or "following"."""
    lower = name.lower()
    if lower in lang.pronouns or lower in lang.articles or lower in _NOT_ENTRIES:
        return False
    return bool(re.search(r"[\\\-_./@+\d]", name)) or (name.islower() and len(name) <= 14)


def _references(c: _Chunk) -> list[QA]:
    lang = c.lang
    kinds, actions = _alternatives(tuple(lang.kinds)), _alternatives(lang.action_verbs)
    name = r"[`'\"«„“]?(?P<name>[\w\\.@/+-]{2,40})[`'\"»“”]?"
    article, rest = rf"(?:{_alternatives(lang.articles)})\s+|l'", rf"(?P<rest>(?:{actions})\b.{{8,}})$"
    forms = [re.compile(rf"^(?:{article})?(?P<kind>{kinds})\s+{name}\s+{rest}", re.S | re.I)]  # "La commande X affiche"
    if lang.code == "en":  # "The X command prints ...": the name before its kind is English word order only
        forms.append(re.compile(rf"^(?:{article})?{name}\s+(?P<kind>{kinds})\s+{rest}", re.S | re.I))
    out = []
    for start, end in c.spans:
        sentence = fold(c.text[start:end])
        for form in forms:
            match = form.match(sentence)
            if match and _names_an_entry(match.group("name"), lang):
                kind = _kind_of(match.group("kind"), lang)
                out.append(
                    c.qa(
                        "reference",
                        {"name": match.group("name"), "kind": kind, "title": c.title},
                        start,
                        end,
                        match.group("name"),
                    )
                )
                break
    # Entry lines of a reference list: an option, or a name under a section titled by its kind ("Options").
    title_words = re.findall(r"\w+", c.heading.lower())
    title_kind = next((lang.kinds[w] for w in title_words if w in lang.kinds), None)
    title_kind = title_kind or next((lang.kinds[w[:-1]] for w in title_words if w[:-1] in lang.kinds), None)  # plural
    for i, line in enumerate(c.lines):
        match = _ENTRY.match(line.strip())
        if not match:
            continue
        entry, desc = match.group("name"), match.group("desc")
        kind = _kind_of("option", lang) if entry.startswith("-") else title_kind
        if kind is None or len(desc.split()) < 3 or _letters_share(desc) < 0.6 or "...." in desc or ". . ." in desc:
            continue
        lead = len(line) - len(line.lstrip())
        d_start = c.line_starts[i] + lead + match.start("desc")
        out.append(c.qa("reference", {"name": entry, "kind": kind, "title": c.title}, d_start, d_start + len(desc), entry))
    return out


def _procedures(c: _Chunk) -> list[QA]:
    if not c.title:
        return []
    out = []
    i = 0
    while i < len(c.lines):
        match = _STEP.match(c.lines[i].strip())
        if not match or (match.group(1) or match.group(2)) != "1":
            i += 1
            continue
        j, expected = i, 1
        while j < len(c.lines) and (step := _STEP.match(c.lines[j].strip())) and int(step.group(1) or step.group(2)) == expected:
            if len(step.group(3).split()) < 3 or _letters_share(step.group(3)) < 0.6 or _MARKUP.search(step.group(3)):
                break
            j, expected = j + 1, expected + 1
        if expected - 1 >= 2:
            start, end = c.line_starts[i], c.line_starts[j] - 1
            answer = "\n".join(line.strip() for line in c.lines[i:j])
            out.append(c.qa("procedure", {"title": c.title}, start, end, f"steps|{i}", answer=answer))
        i = max(j, i + 1)
    return out


def _lists(c: _Chunk) -> list[QA]:
    if not c.title:
        return []
    out = []
    i = 0
    while i < len(c.lines):
        intro = c.lines[i].strip()
        if intro.endswith(":") and 10 <= len(intro) <= 150 and not _BULLET.match(intro) and names_something(intro, c.lang):
            j = i + 1
            while j < len(c.lines) and (item := c.lines[j].strip()) and not item.endswith(":") and _BULLET.match(item):
                j += 1
            items = [line.strip() for line in c.lines[i + 1 : j]]
            if len(items) >= 2 and all(_letters_share(x) >= 0.5 and ". . ." not in x for x in items):
                start, end = c.line_starts[i + 1], c.line_starts[j] - 1
                fields = {"intro": fold(intro.rstrip(":").rstrip()), "title": c.title}
                out.append(c.qa("list", fields, start, end, intro, answer="\n".join(items)))
                i = j
                continue
        i += 1
    return out


def _notes(c: _Chunk) -> list[QA]:
    if not c.title:
        return []
    label = re.compile(rf"^(?:{_alternatives(c.lang.note_labels)})\s?:\s*(?=\S)", re.I)
    out = []
    for paragraph in re.finditer(r"[^\n]+(?:\n[^\n]+)*", c.text):
        found = label.match(paragraph.group(0))
        if not found:
            continue
        start = paragraph.start() + found.end()
        inside = [(s, e) for s, e in sentences(c.text[start : paragraph.end()])][:2]
        end = start + inside[-1][1] if inside else paragraph.end()
        body = fold(c.text[start:end])
        if 20 <= len(body) <= 500 and _letters_share(body) >= 0.6:
            out.append(c.qa("note", {"title": c.title}, start, end, f"note|{paragraph.start()}"))
    return out


_QUALIFIERS = {
    "about",
    "approximately",
    "around",
    "roughly",
    "exactly",
    "only",
    "normally",
    "usually",
    "typically",
    "always",
    "at",
    "up",
    "set",
    "environ",
    "exactement",
    "seulement",
    "normalement",
    "généralement",
    "de",
    "à",
    "etwa",
    "ungefähr",
    "genau",
    "nur",
    "normalerweise",
    "meist",
    "bei",
    "auf",
    "aproximadamente",
    "exactamente",
    "solo",
    "normalmente",
    "generalmente",
    "a",
    "en",
}


def _numbers(c: _Chunk) -> list[QA]:
    lang = c.lang
    subject = re.compile(
        rf"^(?P<subject>(?:{_alternatives(lang.articles)})\s+[^,;:()\d]{{3,70}}?)\s+(?:{_alternatives(lang.value_verbs)})\s+(?P<rest>.+)$",
        re.S | re.I,
    )
    out = []
    for start, end in c.spans:
        sentence = fold(c.text[start:end])
        if len(_NUMBER.findall(sentence)) != 1 or _REFERENCE_TO_PAGES.search(sentence) or _MARKUP.search(sentence):
            continue  # one number: the question has one answer; page and section numbers are not facts
        match = subject.match(sentence)
        rest = match.group("rest").split() if match else []
        if not rest or not (
            _NUMBER.fullmatch(rest[0].rstrip(".,;"))
            or (rest[0].lower() in _QUALIFIERS and len(rest) > 1 and _NUMBER.fullmatch(rest[1].rstrip(".,;")))
        ):
            continue
        phrase = match.group("subject")
        if not names_something(phrase.split(None, 1)[1], lang) or len(phrase.split()) < 3:
            continue
        phrase = phrase[0].lower() + phrase[1:]  # the article: German nouns keep their capital
        out.append(c.qa("numeric", {"subject": phrase, "title": c.title}, start, end, phrase))
    return out


def _section(c: _Chunk) -> list[QA]:
    """A titled section's lead: the chunk must open with its heading, the answer is what follows it."""
    shown = re.search(r"\s+".join(map(re.escape, c.heading.split())), c.text) if c.title and c.spans else None
    if not shown or len(fold(c.text[: shown.start()])) > 12:
        return []  # the chunk does not open with its heading (a heading may wrap over two lines)
    heading_end = shown.end()
    lead = [(s, e) for s, e in c.spans if s >= heading_end][:2]
    if not lead or c.text[heading_end : lead[0][0]].strip(" \n\t:"):
        return []  # something other than the lead paragraph follows the heading
    start, end = lead[0][0], (lead[1][1] if len(lead) > 1 and lead[1][1] - lead[0][0] <= 320 else lead[0][1])
    return [c.qa("section", {"title": c.title}, start, end, c.title)]


def _topic(c: _Chunk) -> list[QA]:
    """A titled chunk's first sentence that mentions the title's subject (a word of it or of its parent heading, or
    its stem; not of the document title): what the documentation states about it."""
    if not c.title:
        return []
    about = (
        c.heading
        if c.title == c.heading
        else f"{c.heading} {section_title({'section': c.chunk.get('section_parent') or ''}, c.lang)}"
    )
    stems = {w.lower()[:6] for w in re.findall(r"[^\W\d_]{4,}", about) if w.lower() not in c.lang.pronouns}
    if not stems:
        return []
    for start, end in c.spans:
        words = {w.lower()[:6] for w in re.findall(r"[^\W\d_]{4,}", c.text[start:end])}
        if stems & words and not _MARKUP.search(c.text[start:end]) and not leans_on_context(c.text[start:end], c.lang):
            return [c.qa("topic", {"title": c.title}, start, end, f"topic|{c.title}")]
    return []


def leans_on_context(sentence: str, lang: Language) -> bool:
    """Whether a sentence opens with a word that points back ("It must be...", "These should...", "Ahora que..."):
    without the sentence before, a reader cannot tell what it is about."""
    text = fold(sentence).replace("’", "'")
    first = text.split(" ", 1)[0].lower().strip("«»\"'“”„,;:") if text else ""
    return first in lang.anaphora and not (lang.impersonal and re.match(lang.impersonal, text, re.I))


def _ends_subject(word: str, verbs: set[str], lang: Language) -> bool:
    """Whether a subject ends before `word`: a verb, or a word in lower case that comes between a subject and its
    verb (an elided one too: "n'est", "s'applique"; not "Mac OS")."""
    lower = word.lower().replace("’", "'")
    if lower in verbs:
        return True
    return word.islower() and (lower in lang.preverbal or ("'" in lower and lower.split("'")[0] + "'" in lang.preverbal))


def _facts(c: _Chunk) -> list[QA]:
    """A sentence whose subject is a noun phrase ("The bounding box of a plot is used by ..."): what the
    documentation says about that subject, answered by the sentence."""
    lang = c.lang
    verbs = {*lang.action_verbs, *lang.auxiliaries, *(v.split()[0] for v in lang.value_verbs + lang.copulas)}
    out = []
    for start, end in c.spans:
        words = fold(c.text[start:end]).split()
        if len(words) < 6 or words[0].lower() not in lang.articles:
            continue
        cut = next(
            (
                j
                for j in range(2, min(10, len(words) - 2))
                if _ends_subject(words[j], verbs, lang) and words[j - 1].lower().strip(",;:") not in lang.dangling
            ),
            None,
        )  # fmt: skip  (not inside a clause: "una de las cosas que *puede* hacer el desarrollador es")
        if cut is None:
            continue
        subject = " ".join(words[:cut]).rstrip(",;:")
        if _MARKUP.search(subject) or not names_something(" ".join(words[1:cut]), lang) or "," in subject:
            continue
        if any(w.lower().strip(",;:") in lang.demonstratives for w in words[1:cut]):
            continue  # "the locations specified here": which ones, the question cannot say
        subject = subject[0].lower() + subject[1:]  # the article: German nouns keep their capital
        out.append(c.qa("fact", {"subject": subject, "title": c.title}, start, end, subject))
    return out


_ABBREVIATION_END = re.compile(r"\b(?:e\.g|i\.e|etc|cf|vs|z\.B|d\.h|bzw|usw|p\. ex|ex|resp|Nr|No|approx|ca)\.$", re.I)


def _complete(answer: str) -> bool:
    """An answer that ends where its sentence ends: not cut after an abbreviation, not inside a URL."""
    cut = _ABBREVIATION_END.search(answer.rstrip()) or "://" in answer or answer.rstrip().endswith("/.")
    return not cut and _letters_share(answer.replace(" ", "")) >= 0.7  # prose, not a code listing


EXTRACTORS = (_definitions, _references, _procedures, _lists, _notes, _numbers, _section, _topic, _facts)


def extractive_questions(chunk: dict, limit: int) -> list[QA]:
    """Up to `limit` questions for one chunk in its language (`chunk["lang"]`, English when absent), types
    interleaved so a chunk yields a mix; none for a language the teacher has no templates for."""
    lang = language(chunk.get("lang") or "en")
    if lang is None:
        return []
    c = _Chunk(chunk, lang)
    by_type = [[qa for qa in extract(c) if _complete(qa.answer)] for extract in EXTRACTORS]
    out: list[QA] = []
    seen: set[str] = set()
    answered: set[tuple[int, int]] = set()
    round_ = 0
    while len(out) < limit and any(round_ < len(items) for items in by_type):
        for items in by_type:
            qa = items[round_] if round_ < len(items) else None
            if qa and len(out) < limit and qa.question not in seen and (qa.answer_start, qa.answer_end) not in answered:
                seen.add(qa.question)
                answered.add((qa.answer_start, qa.answer_end))  # one question per span: the same sentence asked twice
                out.append(qa)
        round_ += 1
    return out
