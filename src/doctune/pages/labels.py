"""The user's page labels: a JSONL of {"pdf", "page", "fields"}, each line checked against the schema.

A line that cannot be used is skipped with one report entry naming the labels file, the line and the key at fault;
the other lines are used. Only labeled pages go into the dataset.
"""

from __future__ import annotations

import codecs
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from doctune.page_schema import keys_of, violations

REQUIRED = ("pdf", "page", "fields")
# Byte order marks Windows tools write (Notepad: UTF-8 with BOM; PowerShell 5's `>`: UTF-16), and the text they mean.
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


@dataclass(frozen=True)
class Label:
    document: str  # the document's name (its path relative to the PDF folder)
    page: int  # from 1
    fields: dict
    line: int


def read_records(path: Path, problems: list[dict]) -> list[dict]:
    """The JSON objects of a JSONL file, each with its line number as `_line`; every other non-blank line is added to
    `problems` ({"line", "reason"}). A byte order mark at the start says the encoding (UTF-8, UTF-16); without one the
    file is UTF-8, each line decoded alone (a line that is not UTF-8 costs that line). CRLF line ends are fine."""
    data = Path(path).read_bytes()
    encoding = "utf-8"
    for bom, name in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom) :], name
            break
    if encoding == "utf-8":
        lines: list[bytes | str] = list(data.split(b"\n"))
    else:
        try:
            lines = list(data.decode(encoding).split("\n"))
        except UnicodeDecodeError as exc:
            problems.append({"line": 1, "reason": f"not {encoding.upper()} text as its byte order mark says ({exc.reason})"})
            return []
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except UnicodeDecodeError:
            problems.append({"line": number, "reason": "not UTF-8 text"})
            continue
        except json.JSONDecodeError as exc:
            problems.append({"line": number, "reason": f"not JSON: {exc.msg}"})
            continue
        if not isinstance(record, dict):
            problems.append({"line": number, "reason": "not a JSON object"})
            continue
        records.append(record | {"_line": number})
    return records


def _same(name: str) -> str:
    """A name as compared: Unicode NFC (a file name written on macOS is decomposed, é as e + U+0301)."""
    return unicodedata.normalize("NFC", name)


def resolve_document(
    value: str, names: list[str], unusable: dict[str, str] | None = None, aliases: dict[str, str] | None = None
) -> tuple[str | None, str]:
    """The document a label's "pdf" names, or (None, why not): its path relative to the PDF folder; or a path that
    ends in one (an absolute path, a path from another machine), the longest such; or a file name that only one
    document has. `unusable` holds the PDFs found but skipped, with the reason; `aliases` the copies of a document (same
    content) and the name the document is used under. Names match in any Unicode normalisation."""
    wanted = _same(PurePosixPath(value.replace("\\", "/")).as_posix().removeprefix("./"))
    known = {_same(name): name for name in names} | {_same(copy): original for copy, original in (aliases or {}).items()}
    skipped = {_same(name): (name, reason) for name, reason in (unusable or {}).items() if _same(name) not in known}

    def found(key: str) -> tuple[str | None, str]:
        if key in known:
            return known[key], ""
        name, reason = skipped[key]
        return None, f"pdf: {name} cannot be used ({reason})"

    if wanted in known or wanted in skipped:
        return found(wanted)
    ends = [key for key in (*known, *skipped) if wanted.endswith("/" + key)]
    if ends:
        return found(max(ends, key=len))
    base = PurePosixPath(wanted).name
    by_name = sorted({key for key in (*known, *skipped) if PurePosixPath(key).name == base})
    if len(by_name) == 1:
        return found(by_name[0])
    if by_name:
        shown = sorted({known.get(key) or skipped[key][0] for key in by_name})
        return None, f"pdf: {value!r} is ambiguous ({', '.join(shown)}); give the path relative to the PDF folder"
    return None, f"pdf: no PDF {value!r} among the {len(names)} found"


def _text_problem(value: object, where: str) -> str | None:
    """Where a value holds a lone UTF-16 surrogate ("\\ud83d": half an emoji an exporter cut), which is not text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where}: {value[exc.start]!r} at char {exc.start} is half a UTF-16 surrogate pair, not text"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _text_problem(key, where) if isinstance(key, str) else None
        found = found or _text_problem(item, f"{where}.{key}")
        if found:
            return found
    return None


def _declared_keys(schema: dict) -> list[str] | None:
    """The keys a label's fields may have: the schema's properties; None (any key) when it names none or allows others
    itself (additionalProperties set to true or to a schema, patternProperties)."""
    if not schema.get("properties") or "patternProperties" in schema:
        return None
    if schema.get("additionalProperties", False) is not False:
        return None
    return keys_of(schema)


def _under_fields(problem: str) -> str:
    """A schema violation of the fields object named from the record: "fields.title: ..." or "fields: ..."."""
    where, _, message = problem.partition(": ")
    return f"fields: {message}" if where == "(the object)" else f"fields.{where}: {message}"


def read_labels(
    path: Path,
    page_counts: dict[str, int],
    schema: dict,
    skipped: list[dict],
    unusable: dict[str, str] | None = None,
    aliases: dict[str, str] | None = None,
) -> list[Label]:
    """The usable labels of the file, in file order; every other line is added to `skipped` with its reason.

    `page_counts` holds the usable documents and their page counts; `unusable` the PDFs skipped, with the reason;
    `aliases` the copies of a document (same content, used once) and the name it is used under.
    """
    path = Path(path)
    shown = path.name

    def bad(line: int, key: str, reason: str, labeled: tuple[str, int] | None = None) -> None:
        """`labeled`: the (PDF, page) the line labels, once known, so the report names it beside the line."""
        document, page = labeled or (None, None)
        skipped.append({"file": shown, "line": line, "page": page, "document": document, "key": key, "reason": reason,
                        "kind": "bad_label"})  # fmt: skip

    problems: list[dict] = []
    records = read_records(path, problems)
    for problem in problems:  # lines that are not JSON objects
        bad(problem["line"], "", problem["reason"])
    names = sorted(page_counts)
    keys = _declared_keys(schema)
    seen: dict[tuple[str, int], int] = {}
    labels = []
    for record in records:
        line = record.pop("_line")
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            bad(line, missing[0], f"missing key {', '.join(repr(k) for k in missing)}")
            continue
        extra = sorted(set(record) - set(REQUIRED))
        if extra:
            bad(line, extra[0], f"unknown key {', '.join(repr(k) for k in extra)} (expected pdf, page, fields)")
            continue
        if not isinstance(record["pdf"], str) or not record["pdf"].strip():
            bad(line, "pdf", f"pdf: expected a file name, got {record['pdf']!r}")
            continue
        document, why = resolve_document(record["pdf"].strip(), names, unusable, aliases)
        if document is None:
            bad(line, "pdf", why)
            continue
        page = record["page"]
        if isinstance(page, float) and page.is_integer():  # 3.0: a whole number, as JSON Schema counts it (pandas writes it)
            page = int(page)
        if isinstance(page, bool) or not isinstance(page, int):
            bad(line, "page", f"page: expected a page number from 1, got {page!r}")
            continue
        if not 1 <= page <= page_counts[document]:
            bad(line, "page", f"page: {page} is out of range ({document} has {page_counts[document]} pages)")
            continue
        fields = record["fields"]
        if not isinstance(fields, dict):
            bad(line, "fields", f"fields: expected a JSON object, got {type(fields).__name__}", (document, page))
            continue
        not_text = _text_problem(fields, "fields")
        if not_text:
            bad(line, not_text.split(":", 1)[0], not_text, (document, page))
            continue
        problems_ = [_under_fields(problem) for problem in violations(fields, schema)]
        if problems_:
            bad(line, problems_[0].split(":", 1)[0], "; ".join(problems_), (document, page))
            continue
        unknown = [key for key in fields if key not in keys] if keys is not None else []
        if unknown:  # a typo ("titel") the schema lets through would be trained on and never scored
            why = f"fields.{unknown[0]}: not a key of the schema (its keys: {', '.join(keys)})"
            bad(line, f"fields.{unknown[0]}", why, (document, page))
            continue
        if (document, page) in seen:
            why = f"duplicate label for {document} page {page} (first on line {seen[(document, page)]})"
            bad(line, "page", why, (document, page))
            continue
        seen[(document, page)] = line
        labels.append(Label(document, page, fields, line))
    return labels
