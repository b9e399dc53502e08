"""The user's page labels: a JSONL of {"pdf", "page", "fields"}, each line checked against the schema.

A line that cannot be used is skipped with one report entry naming the labels file, the line and the key at fault;
the other lines are used. Only labeled pages go into the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from doctune.page_schema import violations
from doctune.records import read_jsonl

REQUIRED = ("pdf", "page", "fields")


@dataclass(frozen=True)
class Label:
    document: str  # the document's name (its path relative to the PDF folder)
    page: int  # from 1
    fields: dict
    line: int


def resolve_document(value: str, names: list[str], unusable: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The document a label's "pdf" names (its path relative to the PDF folder, or a file name that only one document
    has), or (None, why not). `unusable` holds the PDFs found but skipped, with the reason."""
    wanted = PurePosixPath(value.replace("\\", "/")).as_posix().removeprefix("./")
    for name, reason in (unusable or {}).items():
        if wanted == name or (wanted == PurePosixPath(name).name and wanted not in names):
            return None, f"pdf: {name} cannot be used ({reason})"
    if wanted in names:
        return wanted, ""
    by_name = [name for name in names if PurePosixPath(name).name == PurePosixPath(wanted).name]
    if len(by_name) == 1:
        return by_name[0], ""
    if by_name:
        return None, f"pdf: {value!r} is ambiguous ({', '.join(by_name)}); give the path relative to the PDF folder"
    return None, f"pdf: no PDF {value!r} among the {len(names)} found"


def _under_fields(problem: str) -> str:
    """A schema violation of the fields object named from the record: "fields.title: ..." or "fields: ..."."""
    where, _, message = problem.partition(": ")
    return f"fields: {message}" if where == "(the object)" else f"fields.{where}: {message}"


def read_labels(
    path: Path, page_counts: dict[str, int], schema: dict, skipped: list[dict], unusable: dict[str, str] | None = None
) -> list[Label]:
    """The usable labels of the file, in file order; every other line is added to `skipped` with its reason.

    `page_counts` holds the usable documents and their page counts; `unusable` the PDFs skipped, with the reason.
    """
    path = Path(path)
    shown = path.name

    def bad(line: int, key: str, reason: str) -> None:
        skipped.append({"file": shown, "line": line, "page": None, "key": key, "reason": reason, "kind": "bad_label"})

    problems: list[dict] = []
    records = read_jsonl(path, problems)
    for problem in problems:  # lines that are not JSON objects
        bad(problem["line"], "", problem["reason"])
    names = sorted(page_counts)
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
        document, why = resolve_document(record["pdf"].strip(), names, unusable)
        if document is None:
            bad(line, "pdf", why)
            continue
        page = record["page"]
        if isinstance(page, bool) or not isinstance(page, int):
            bad(line, "page", f"page: expected a page number from 1, got {page!r}")
            continue
        if not 1 <= page <= page_counts[document]:
            bad(line, "page", f"page: {page} is out of range ({document} has {page_counts[document]} pages)")
            continue
        fields = record["fields"]
        if not isinstance(fields, dict):
            bad(line, "fields", f"fields: expected a JSON object, got {type(fields).__name__}")
            continue
        problems_ = [_under_fields(problem) for problem in violations(fields, schema)]
        if problems_:
            bad(line, problems_[0].split(":", 1)[0], "; ".join(problems_))
            continue
        if (document, page) in seen:
            bad(line, "page", f"duplicate label for {document} page {page} (first on line {seen[(document, page)]})")
            continue
        seen[(document, page)] = line
        labels.append(Label(document, page, fields, line))
    return labels
