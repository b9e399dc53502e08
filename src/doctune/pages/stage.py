"""The pages stage: PDF pages -> page images with their JSON fields, split by document, hard negatives in train.

Outputs `dataset` (train/validation/test JSONL, images/, schema.json, instruction.txt) and `report` (Markdown and
JSON: counts, which documents went where, sample labels, every skipped file, page and label line with its reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pymupdf
from PIL import Image
from tqdm import tqdm

from doctune.artifacts import ArtifactRef, manifest_digest, sha256_file
from doctune.cache import Cache
from doctune.config import RunConfig
from doctune.page_schema import load_schema, violations
from doctune.pages import augment, report, selfsup, split
from doctune.pages.labels import Label, read_labels
from doctune.pages.render import cached_png
from doctune.records import (
    PAGE_INSTRUCTION_FILE,
    PAGE_SCHEMA_FILE,
    PAGE_TEST_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    write_jsonl,
)
from doctune.tracking import StageRun

SPLIT_FILES = {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "test": PAGE_TEST_FILE}
IMAGES = "images"


class PagesError(RuntimeError):
    """No usable page, or a PDF source that cannot be read; the message says what was found."""


@dataclass
class Document:
    name: str  # path relative to the PDF folder, '/'-separated (the file name for a single-file source)
    path: Path
    sha256: str = ""
    pages: int = 0


@dataclass
class Page:
    """One labeled, rendered page on its way into the dataset."""

    document: str
    page: int
    fields: dict
    source: str  # "labels" | "text_layer"
    png: Path  # the rendered page in the cache

    @property
    def id(self) -> str:
        return f"{self.document}#p{self.page}"


@dataclass
class Outcome:
    pages: list[Page] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    documents: list[Document] = field(default_factory=list)  # readable, distinct PDFs
    found: int = 0  # PDF files found
    rendered: int = 0  # pages rendered now (not from the cache)
    left_out: int = 0  # labeled pages beyond max_pages_per_document
    duplicates: dict[str, str] = field(default_factory=dict)  # a copy's name -> the name of the document it copies


def pdf_source(config: RunConfig) -> Path:
    return Path(config.pages.pdfs or config.ingest.pdfs)


def shown(name: str | os.PathLike) -> str:
    """A file name as it can be printed and stored (reports, JSONL, MLflow): bytes that are not UTF-8 on disk (a name
    from a Windows archive, caf\\xe9.pdf) become backslash escapes instead of unencodable surrogates."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def list_pdfs(source: Path) -> list[tuple[str, Path]]:
    """(name, path) of every *.pdf (any case) under a folder, links followed once, or the one file given; the name is
    the path relative to the folder, '/'-separated, as `shown` writes it."""
    source = Path(source)
    if source.is_file():
        return [(shown(source.name), source)]
    if not source.is_dir():
        raise PagesError(f"PDF source {source} does not exist (set pages.pdfs, or ingest.pdfs)")
    found, walked = [], set()
    for root, folders, files in os.walk(source, followlinks=True):
        info = os.stat(root)
        if (info.st_dev, info.st_ino) in walked:  # a link back to a folder already listed
            folders[:] = []
            continue
        walked.add((info.st_dev, info.st_ino))
        folders.sort()
        for name in sorted(files):
            if name.lower().endswith(".pdf"):
                path = Path(root) / name
                found.append((shown(path.relative_to(source).as_posix()), path))
    if not found:
        raise PagesError(f"no *.pdf files under {source}")
    return sorted(found)


def open_pdf(path: Path) -> pymupdf.Document:
    """The PDF, by name; one whose name is not UTF-8 on disk (which pymupdf cannot open by name) from its bytes."""
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        return pymupdf.open(stream=Path(path).read_bytes(), filetype="pdf")
    return pymupdf.open(path)


def _problem(exc: OSError) -> str:
    return f"cannot be read: {exc.strerror or type(exc).__name__}"


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """The stage reads files outside MLflow: key its result on the PDFs', the labels' and the schema's content."""
    rows: list[dict] = []
    try:
        for name, path in list_pdfs(pdf_source(config)):
            try:
                rows.append({"path": name, "sha256": sha256_file(path)})
            except OSError as exc:
                rows.append({"path": name, "skipped": _problem(exc)})
    except (PagesError, OSError) as exc:
        rows.append({"error": str(exc)})
    digests = {"pdfs": manifest_digest({"files": rows})}
    for key, path in (("labels", config.pages.labels), ("schema", config.pages.schema_file)):
        if path is not None:
            try:
                digests[key] = sha256_file(path)
            except OSError as exc:
                digests[key] = f"unreadable: {_problem(exc)}"
    return digests


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _skip(skipped: list[dict], file: str, reason: str, kind: str, page: int | None = None) -> None:
    skipped.append({"file": file, "page": page, "line": None, "key": "", "reason": reason, "kind": kind})


def open_documents(source: Path, skipped: list[dict], duplicates: dict[str, str] | None = None) -> tuple[list[Document], int]:
    """The PDFs that can be used (readable, not encrypted, with pages, not a copy of an earlier one), and how many
    files were found; the others are reported. A copy's name and the name of the document it copies go in
    `duplicates` (a label may name either)."""
    documents, first_seen = [], {}
    found = list_pdfs(source)
    for name, path in found:
        document = Document(name, path)
        try:
            document.sha256 = sha256_file(path)
        except OSError as exc:
            _skip(skipped, name, _problem(exc), "unreadable_pdf")
            continue
        if document.sha256 in first_seen:
            _skip(skipped, name, f"same content as {first_seen[document.sha256]}: used once", "duplicate_pdf")
            if duplicates is not None:
                duplicates[name] = first_seen[document.sha256]
            continue
        try:
            with open_pdf(path) as doc:
                if doc.needs_pass:
                    _skip(skipped, name, "encrypted: it needs a password", "encrypted_pdf")
                    continue
                document.pages = doc.page_count
        except Exception as exc:  # pymupdf's FileDataError and friends: a corrupt or non-PDF file
            _skip(skipped, name, f"cannot be opened as a PDF: {exc}", "unreadable_pdf")
            continue
        if document.pages == 0:
            _skip(skipped, name, "no pages", "unreadable_pdf")
            continue
        first_seen[document.sha256] = name
        documents.append(document)
    return documents, len(found)


def spread(n: int, limit: int) -> list[int]:
    """Page indexes to try in order: `limit` pages spread evenly over the document first, then the rest."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    first = sorted({round(k * n / limit) for k in range(limit)})
    return first + [i for i in range(n) if i not in set(first)]


def _render(page: pymupdf.Page, document: Document, cache: Cache, render, outcome: Outcome) -> Path | None:
    try:
        path, fresh = cached_png(cache, document.sha256, page, render.dpi, render.max_pixels)
    except Exception as exc:  # one page that does not render costs that page only
        _skip(outcome.skipped, document.name, f"could not be rendered: {_error(exc)}", "render_failed", page.number + 1)
        return None
    outcome.rendered += fresh
    return path


def _self_supervised(doc: pymupdf.Document, document: Document, config, schema: dict, cache, outcome: Outcome) -> None:
    settings = config.pages
    furniture = selfsup.DocumentFurniture.of(doc)
    taken = []
    for index in spread(doc.page_count, settings.max_pages_per_document):
        if settings.max_pages_per_document and len(taken) >= settings.max_pages_per_document:
            break
        number = index + 1
        try:
            page = doc[index]
            fields, why = selfsup.page_fields(page, furniture)
        except Exception as exc:  # a page pymupdf cannot read
            _skip(outcome.skipped, document.name, f"text layer could not be read: {_error(exc)}", "unreadable_page", number)
            continue
        if fields is None:
            kind = "no_text_layer" if why == selfsup.NO_TEXT_LAYER else "no_usable_field"
            _skip(outcome.skipped, document.name, why, kind, number)
            continue
        problems = violations(fields, schema)
        if problems:
            _skip(outcome.skipped, document.name, f"labels do not follow the schema: {'; '.join(problems)}", "schema", number)
            continue
        png = _render(page, document, cache, settings.render, outcome)
        if png is not None:
            taken.append(Page(document.name, number, fields, "text_layer", png))
    outcome.pages.extend(sorted(taken, key=lambda p: p.page))


def _labeled(doc: pymupdf.Document, document: Document, labels: list[Label], config, cache, outcome: Outcome) -> None:
    limit = config.pages.max_pages_per_document
    ordered = sorted(labels, key=lambda label: label.page)
    if limit and len(ordered) > limit:
        outcome.left_out += len(ordered) - limit
        ordered = ordered[:limit]
    for label in ordered:
        try:
            page = doc[label.page - 1]
        except Exception as exc:
            _skip(outcome.skipped, document.name, f"could not be read: {_error(exc)}", "unreadable_page", label.page)
            continue
        png = _render(page, document, cache, config.pages.render, outcome)
        if png is not None:
            outcome.pages.append(Page(document.name, label.page, label.fields, "labels", png))


def collect(config: RunConfig, schema: dict, progress: bool = True) -> Outcome:
    """Every usable page of the source, labeled and rendered; everything left out is in `skipped`."""
    settings = config.pages
    outcome = Outcome()
    outcome.documents, outcome.found = open_documents(pdf_source(config), outcome.skipped, outcome.duplicates)
    cache = Cache(config.project.workdir / "cache")
    labels_by_document: dict[str, list[Label]] = {}
    if settings.labels is not None:
        if not Path(settings.labels).is_file():
            raise PagesError(f"pages.labels: {settings.labels} does not exist or is not a file")
        counts = {d.name: d.pages for d in outcome.documents}
        unusable = {item["file"]: item["reason"] for item in outcome.skipped if item["file"] not in outcome.duplicates}
        try:
            labels = read_labels(settings.labels, counts, schema, outcome.skipped, unusable, outcome.duplicates)
        except OSError as exc:
            raise PagesError(f"pages.labels: {settings.labels} cannot be read ({exc.strerror or type(exc).__name__})") from None
        for label in labels:
            labels_by_document.setdefault(label.document, []).append(label)
    for document in tqdm(outcome.documents, unit="pdf", desc="pages", disable=not progress, file=sys.stderr):
        if settings.labels is not None and document.name not in labels_by_document:
            continue
        try:
            with open_pdf(document.path) as doc:
                if settings.labels is not None:
                    _labeled(doc, document, labels_by_document[document.name], config, cache, outcome)
                else:
                    _self_supervised(doc, document, config, schema, cache, outcome)
        except Exception as exc:  # changed or broken since it was opened
            _skip(outcome.skipped, document.name, f"could not be processed: {_error(exc)}", "unreadable_pdf")
    return outcome


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _store(png: bytes, images: Path) -> str:
    name = f"{hashlib.sha256(png).hexdigest()}.png"
    target = images / name
    if not target.exists():
        target.write_bytes(png)
    return f"{IMAGES}/{name}"


def build_records(outcome: Outcome, config: RunConfig, folder: Path) -> tuple[dict[str, list[dict]], str]:
    """Records per split (images written under folder/images), and the split mode."""
    settings = config.pages
    images = folder / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    sides, mode = split.split_pages([(p.document, p.page) for p in outcome.pages], settings.split.train,
                                    settings.split.validation, settings.split.seed)  # fmt: skip
    records: dict[str, list[dict]] = {name: [] for name in split.SPLITS}
    by_id = {}
    for page in sorted(outcome.pages, key=lambda p: (p.document, p.page)):
        png = page.png.read_bytes()
        width, height = _image_size(page.png)
        record = {
            "id": page.id,
            "document": page.document,
            "page": page.page,
            "image": _store(png, images),
            "width": width,
            "height": height,
            "fields": page.fields,
            "source": page.source,
            "augmentation": None,
        }
        records[sides[(page.document, page.page)]].append(record)
        by_id[page.id] = (record, png)
    train_ids = [record["id"] for record in records["train"]]
    for record_id, kind in augment.choose(train_ids, settings.augment.fraction, settings.augment.kinds, settings.augment.seed):
        record, png = by_id[record_id]
        copy = augment.augment_png(png, kind, augment.rng_for(settings.augment.seed, f"{record_id}+{kind}"))
        records["train"].append(record | {"id": f"{record_id}+{kind}", "image": _store(copy, images), "augmentation": kind})
    records["train"].sort(key=lambda r: (r["document"], r["page"], r["augmentation"] or ""))
    return records, mode


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    settings = config.pages
    schema = load_schema(settings.schema_file)
    outcome = collect(config, schema)
    outputs: dict[str, ArtifactRef] = {}
    with tempfile.TemporaryDirectory(prefix="doctune-pages-") as tmp:
        out = Path(tmp)
        dataset = out / "dataset"
        records, mode = build_records(outcome, config, dataset) if outcome.pages else ({s: [] for s in split.SPLITS}, "")
        summary = report.summarize(outcome, records, mode, config, schema)
        tracker.log_metrics(
            {f"pages_{name}": len(rows) for name, rows in records.items()}
            | {
                "pages_skipped": len(outcome.skipped),
                "pages_augmented": summary["augmented"],
                "pages_rendered": outcome.rendered,
                "documents": len(summary["documents_used"]),
            }
        )
        folder = out / "report"
        report.write(folder, summary)
        outputs["report"] = tracker.log_output("report", folder, kind="pages_report")
        if not outcome.pages:
            raise PagesError(report.nothing_usable(summary, pdf_source(config), tracker.run_id))

        for name, rows in records.items():
            write_jsonl(dataset / SPLIT_FILES[name], rows)
        (dataset / PAGE_SCHEMA_FILE).write_text(json.dumps(schema, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (dataset / PAGE_INSTRUCTION_FILE).write_text(settings.instruction, encoding="utf-8")
        outputs["dataset"] = tracker.log_output("dataset", dataset, kind="page_dataset")
        shutil.rmtree(dataset, ignore_errors=True)
    return outputs
