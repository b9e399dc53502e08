"""The ingest stage: PDFs -> cleaned pages -> chunks, with a report row for every input file."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from doctune.artifacts import ArtifactRef, manifest_digest, sha256_file
from doctune.config import IngestConfig, RunConfig
from doctune.ingest.documents import (
    DocumentResult,
    chunk_clean_document,
    clean_document,
    extract_task,
    page_tasks,
    segments,
    tokenize_segment,
    warm_up,
)
from doctune.ingest.listing import Entry, IngestError, os_reason, scan_folder, shown
from doctune.ingest.pdf import FileProbe, close_cached, probe, tesseract_available
from doctune.models import resolve_model
from doctune.records import CHUNKS_FILE, INGEST_REPORT_FILE, PAGES_FILE
from doctune.tracking import StageRun


@dataclass
class IngestResult:
    pages: list[dict] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # the report: one row per input file
    seconds: float = 0.0
    read: list[tuple[Path, str]] = field(default_factory=list)  # (path, source) of every file that could be read

    @property
    def summary(self) -> dict:
        usable = [f for f in self.files if f["status"] in ("ok", "partial")]
        flagged = sum(1 for p in self.pages if p["flags"] and not p["text"])
        return {
            "input_files": len(self.files),
            "documents": len(usable),
            "pages": len(self.pages),
            "pages_with_text": sum(1 for p in self.pages if p["text"]),
            "flagged_pages": flagged,
            "ocr_pages": sum(1 for p in self.pages if "ocr" in p["flags"]),
            "chunks": len(self.chunks),
            "skipped_files": len(self.files) - len(usable),
            "seconds": round(self.seconds, 3),
        }


def list_pdfs(folder: Path) -> list[Path]:
    """The PDFs under a folder that can be listed (links followed); see scan_folder for the ones that cannot."""
    return [entry.path for entry in scan_folder(folder) if not entry.problem]


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """A fresh ingest reads files outside MLflow: key its results on their content.

    An entry that cannot be read is keyed by its path and the reason it is skipped, not by size and mtime: making a
    file readable (chmod) or mending a link changes neither, so such a key would reuse a result that skipped the file.
    The reason is exactly what the stage's result depends on for it; once readable it is keyed by its content.
    """
    if "sources" in inputs:
        return {}
    rows = []
    for entry in scan_folder(config.ingest.pdfs):
        if entry.problem:
            rows.append({"path": entry.source, "skipped": entry.problem})
            continue
        try:
            rows.append({"path": entry.source, "size": entry.path.stat().st_size, "sha256": sha256_file(entry.path)})
        except OSError as exc:
            rows.append({"path": entry.source, "skipped": f"cannot be read: {os_reason(exc)}"})
    return {"sources": manifest_digest({"files": sorted(rows, key=lambda row: row["path"])})}


class _Inline:
    """The executor interface, run in this process: workers=1 is a plain loop."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # as a process pool would: the caller sees it on result()
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def _report_row(probe_: FileProbe, doc: DocumentResult | None, ocr_note: str) -> dict:
    row = {
        "source": probe_.source,
        "sha256": probe_.sha256,
        "bytes": probe_.size,
        "status": probe_.status,
        "reason": probe_.reason,
        "doc_id": doc.doc_id if doc else "",
        "pages": probe_.page_count,
        "pages_with_text": 0,
        "flags": {},
        "chunks": 0,
        "lang": doc.lang if doc else "",
    }
    if doc is None:
        return row
    row["pages_with_text"] = sum(1 for p in doc.pages if p["text"])
    row["flags"] = dict(sorted(doc.flag_counts.items()))
    row["chunks"] = len(doc.chunks)
    if not doc.chunks:
        detail = ", ".join(f"{n} {flag}" for flag, n in sorted(doc.flag_counts.items()))
        row["status"], row["reason"] = "skipped", f"no usable text on any page ({detail}){ocr_note}"
    elif doc.flag_counts.get("error"):
        row["status"], row["reason"] = "partial", f"{doc.flag_counts['error']} page(s) could not be read"
    return row


def ocr_note(config: IngestConfig) -> str:
    """What a skipped image-only document's report row adds about OCR."""
    if config.ocr == "never":
        return "; OCR disabled (ingest.ocr=never)"
    return "" if tesseract_available() else "; OCR unavailable: tesseract is not installed"


def mark_duplicates(probes: list[FileProbe]) -> None:
    """A file with the same content as an earlier one is reported as its duplicate and not ingested twice."""
    first_seen: dict[str, str] = {}
    for item in probes:
        if item.status != "ok":
            continue
        if item.sha256 in first_seen:
            item.status, item.reason = "duplicate", f"same content as {first_seen[item.sha256]}"
        else:
            first_seen[item.sha256] = item.source


class DocumentScheduler:
    """Per document: extract page ranges -> clean -> tokenize segments -> chunk, over a pool of workers.

    Extractions are fed `workers` at a time so a finished document's later steps start at once instead of queueing
    behind every extraction; a large document's tokenization is split over workers too. A step that fails marks
    its document skipped (with the reason) and costs no other document.
    """

    def __init__(self, pool, workers: int, config: IngestConfig, tokenizer_file: Path, bar):
        self.pool, self.workers, self.config, self.tokenizer_file, self.bar = pool, workers, config, str(tokenizer_file), bar
        self.jobs: deque = deque()
        self.remaining: Counter = Counter()  # steps outstanding per document
        self.raw: dict[str, list] = {}  # extracted pages so far
        self.cleaned: dict[str, DocumentResult] = {}
        self.offsets: dict[str, dict[int, list]] = {}  # token offsets per segment start
        self.running: dict[Future, tuple[str, FileProbe, int]] = {}
        self.docs: dict[str, DocumentResult] = {}  # finished documents

    def run(self, usable: list[FileProbe]) -> dict[str, DocumentResult]:
        self.jobs.extend((item, first, last) for item in usable for first, last in page_tasks(item))
        self.remaining.update(item.sha256 for item, _, _ in self.jobs)
        self.raw = {p.sha256: [] for p in usable}
        self.feed()
        while self.running:
            done, _ = wait(self.running, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item, position = self.running.pop(future)
                if item.status != "ok":
                    continue  # an earlier step of this document failed
                try:
                    value = future.result()
                except Exception as exc:  # one document's failure must not cost the others
                    item.status, item.reason = "skipped", f"{kind} step failed: {type(exc).__name__}: {exc}"
                    for state in (self.raw, self.cleaned, self.offsets):
                        state.pop(item.sha256, None)
                    continue
                {"extract": self.extracted, "clean": self.clean_done, "tokenize": self.tokenized}[kind](item, position, value)
            self.feed()
        return self.docs

    def feed(self) -> None:
        while self.jobs and sum(kind == "extract" for kind, _, _ in self.running.values()) < self.workers:
            item, first, last = self.jobs.popleft()
            self.running[self.pool.submit(extract_task, item, first, last, self.config)] = ("extract", item, first)

    def extracted(self, item: FileProbe, _: int, pages: list) -> None:
        key = item.sha256
        self.raw[key].extend(pages)
        self.bar.update(len(pages))
        self.remaining[key] -= 1
        if self.remaining[key] == 0:
            self.running[self.pool.submit(clean_document, item, self.raw.pop(key), self.config)] = ("clean", item, 0)

    def clean_done(self, item: FileProbe, _: int, doc: DocumentResult) -> None:
        key = item.sha256
        self.cleaned[key] = doc
        pieces = segments(doc)
        self.offsets[key] = {}
        self.remaining[key] = len(pieces)
        for start, end in pieces:
            task = self.pool.submit(tokenize_segment, self.tokenizer_file, doc.text[start:end], start)
            self.running[task] = ("tokenize", item, start)
        if not pieces:
            self.docs[key] = chunk_clean_document(self.cleaned.pop(key), [], self.config)

    def tokenized(self, item: FileProbe, start: int, offsets: list) -> None:
        key = item.sha256
        self.offsets[key][start] = offsets
        self.remaining[key] -= 1
        if self.remaining[key] == 0:
            by_start = self.offsets.pop(key)
            merged = [pair for position in sorted(by_start) for pair in by_start[position]]
            self.docs[key] = chunk_clean_document(self.cleaned.pop(key), merged, self.config)


def _probe_all(pool, entries: list[Entry]) -> list[FileProbe]:
    """One probe per entry, in entry order; an entry the listing could not use, or whose probe fails, is skipped."""
    futures = {i: pool.submit(probe, e.path, e.source) for i, e in enumerate(entries) if not e.problem}
    probes = []
    for i, entry in enumerate(entries):
        reason = entry.problem
        if not reason:
            try:
                probes.append(futures[i].result())
                continue
            except Exception as exc:  # one file's failure must not cost the others
                reason = f"could not be examined: {type(exc).__name__}: {exc}"
        probes.append(FileProbe(path=entry.path, source=entry.source, size=0, sha256="", status="skipped", reason=reason))
    return probes


def ingest_folder(folder: Path, config: IngestConfig, tokenizer_file: Path, progress: bool = True) -> IngestResult:
    """Ingest and chunk every PDF under a folder. Bad files are reported, never fatal here."""
    started = time.perf_counter()
    entries = scan_folder(Path(folder))
    workers = config.workers or os.cpu_count() or 1
    warm_up(str(tokenizer_file))
    # fork: spawn would re-import the caller's __main__ (a KFP executor); workers touch only pymupdf and tokenizers.
    pool = (
        _Inline()
        if workers == 1
        else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=close_cached)
    )
    try:
        probes = _probe_all(pool, entries)
        mark_duplicates(probes)
        usable = sorted((p for p in probes if p.status == "ok"), key=lambda p: -p.page_count)
        total = sum(p.page_count for p in usable)
        with tqdm(total=total, unit="page", desc="ingest", disable=not progress, file=sys.stderr) as bar:
            docs = DocumentScheduler(pool, workers, config, tokenizer_file, bar).run(usable)
    finally:
        pool.shutdown(wait=True)
        close_cached()

    result, note = IngestResult(), ocr_note(config)
    for item in probes:  # report and outputs in input order, whatever order workers finished
        if item.sha256:
            result.read.append((item.path, item.source))
        doc = docs.get(item.sha256) if item.status == "ok" else None
        result.files.append(_report_row(item, doc, note))
        if doc is not None:
            result.pages.extend(doc.pages)
            result.chunks.extend(doc.chunks)
    result.seconds = time.perf_counter() - started
    return result


def _cell(value: object) -> str:
    """A Markdown table cell: a '|' or a line break in a name or reason must not break the table."""
    return " ".join(str(value).split("\n")).replace("|", "\\|")


def report_markdown(result: IngestResult) -> str:
    s = result.summary
    lines = [
        "# Ingest report",
        "",
        f"{s['documents']} documents, {s['pages']} pages ({s['flagged_pages']} without usable text, "
        f"{s['ocr_pages']} OCR'd), {s['chunks']} chunks; {s['skipped_files']} of {s['input_files']} files skipped.",
        "",
        "| file | status | pages | with text | flags | chunks | lang | reason |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for row in result.files:
        flags = ", ".join(f"{k}: {v}" for k, v in row["flags"].items())
        lines.append(
            f"| {_cell(row['source'])} | {row['status']} | {row['pages']} | {row['pages_with_text']} | {_cell(flags)} | "
            f"{row['chunks']} | {row['lang']} | {_cell(row['reason'])} |"
        )
    return "\n".join(lines) + "\n"


def _write_parquet(rows: list[dict], features: dict, path: Path) -> None:
    from datasets import Dataset, Features, List, Value

    def as_feature(kind):
        return List(Value("string")) if kind == "list" else Value(kind)

    columns = {name: [row[name] for row in rows] for name in features}  # column-wise: an empty table works too
    Dataset.from_dict(columns, features=Features({k: as_feature(v) for k, v in features.items()})).to_parquet(str(path))


PAGE_FEATURES = {
    "doc_id": "string",
    "source": "string",
    "sha256": "string",
    "page": "int32",
    "text": "string",
    "flags": "list",
    "lang": "string",
}
CHUNK_FEATURES = {
    "chunk_id": "string",
    "doc_id": "string",
    "title": "string",
    "page_start": "int32",
    "page_end": "int32",
    "char_start": "int64",
    "char_end": "int64",
    "n_tokens": "int32",
    "section": "string",
    "section_parent": "string",  # the heading one level up: "Purpose" alone names one of many
    "text": "string",
    "lang": "string",  # the document's: passage labels are written in it
}


def _nothing_usable(result: IngestResult, folder: Path, run_id: str) -> str:
    """One line: how many files, the first reasons, and where the whole report is."""
    files = result.files
    first = "; ".join(f"{f['source']}: {' '.join(f['reason'].split())}" for f in files[:3])
    more = f"; and {len(files) - 3} more" if len(files) > 3 else ""
    return (
        f"no usable document: all {len(files)} files in {shown(folder)} were skipped ({first}{more}); "
        f"every file and why: report/ingest_report.md of MLflow run {run_id}"
    )


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    model_dir = resolve_model(config.model.base_model, config.project.workdir / "cache")
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise IngestError(f"base_model {config.model.base_model!r} has no tokenizer.json (a fast tokenizer), needed for chunking")
    folder = tracker.fetch(inputs["sources"]) if "sources" in inputs else config.ingest.pdfs
    result = ingest_folder(folder, config.ingest, tokenizer_file)
    summary = result.summary
    tracker.log_metrics({k: v for k, v in summary.items()} | {"pages_per_second": summary["pages"] / max(result.seconds, 1e-9)})

    outputs: dict[str, ArtifactRef] = {}
    with tempfile.TemporaryDirectory(prefix="doctune-ingest-") as tmp:
        out = Path(tmp)
        report = out / "report"
        report.mkdir()
        (report / INGEST_REPORT_FILE).write_text(json.dumps({"summary": summary, "files": result.files}, indent=1))
        (report / "ingest_report.md").write_text(report_markdown(result))
        outputs["report"] = tracker.log_output("report", report, kind="ingest_report")
        if summary["documents"] == 0:
            raise IngestError(_nothing_usable(result, folder, tracker.run_id))

        if "sources" in inputs:
            outputs["sources"] = inputs["sources"]
        else:  # the files that were read, so a rerun from this run sees the same content; the rest are in the report
            sources = out / "sources"
            for path, source in result.read:
                target = sources / source
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copy2(path, target)
                except OSError as exc:  # changed under us since it was read
                    raise IngestError(f"{source} could not be copied into the sources artifact: {os_reason(exc)}") from None
            outputs["sources"] = tracker.log_output("sources", sources, kind="pdf_corpus")

        (out / "pages").mkdir()
        _write_parquet(result.pages, PAGE_FEATURES, out / "pages" / PAGES_FILE)
        outputs["pages"] = tracker.log_output("pages", out / "pages", kind="pages")
        (out / "chunks").mkdir()
        _write_parquet(result.chunks, CHUNK_FEATURES, out / "chunks" / CHUNKS_FILE)
        outputs["chunks"] = tracker.log_output("chunks", out / "chunks", kind="chunks")
    return outputs
