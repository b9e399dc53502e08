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

from doctune.artifacts import ArtifactRef, build_manifest, manifest_digest
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
from doctune.ingest.pdf import FileProbe, close_cached, probe, tesseract_available
from doctune.models import resolve_model
from doctune.records import CHUNKS_FILE, INGEST_REPORT_FILE, PAGES_FILE
from doctune.tracking import StageRun


class IngestError(RuntimeError):
    """No usable document, or an input folder that cannot be read."""


@dataclass
class IngestResult:
    pages: list[dict] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)  # the report: one row per input file
    seconds: float = 0.0

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
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"PDF folder {folder} does not exist or is not a folder (set ingest.pdfs)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".pdf")
    if not files:
        raise IngestError(f"no *.pdf files under {folder}")
    return files


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """A fresh ingest reads files outside MLflow: key its results on their content."""
    if "sources" in inputs:
        return {}
    folder = config.ingest.pdfs
    return {"sources": manifest_digest(build_manifest(folder, list_pdfs(folder)))}


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


def ingest_folder(folder: Path, config: IngestConfig, tokenizer_file: Path, progress: bool = True) -> IngestResult:
    """Ingest and chunk every PDF under a folder. Bad files are reported, never fatal here."""
    started = time.perf_counter()
    root = Path(folder)
    files = list_pdfs(root)
    workers = config.workers or os.cpu_count() or 1
    warm_up(str(tokenizer_file))
    # fork: spawn would re-import the caller's __main__ (a KFP executor); workers touch only pymupdf and tokenizers.
    pool = (
        _Inline()
        if workers == 1
        else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=close_cached)
    )
    try:
        probes = [f.result() for f in [pool.submit(probe, path, path.relative_to(root).as_posix()) for path in files]]
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
        doc = docs.get(item.sha256) if item.status == "ok" else None
        result.files.append(_report_row(item, doc, note))
        if doc is not None:
            result.pages.extend(doc.pages)
            result.chunks.extend(doc.chunks)
    result.seconds = time.perf_counter() - started
    return result


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
            f"| {row['source']} | {row['status']} | {row['pages']} | {row['pages_with_text']} | {flags} | "
            f"{row['chunks']} | {row['lang']} | {row['reason']} |"
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
    "page_start": "int32",
    "page_end": "int32",
    "char_start": "int64",
    "char_end": "int64",
    "n_tokens": "int32",
    "section": "string",
    "text": "string",
}


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
            reasons = "; ".join(f"{f['source']}: {f['reason']}" for f in result.files)
            raise IngestError(f"no usable document among {len(result.files)} files in {folder} ({reasons})")

        if "sources" in inputs:
            outputs["sources"] = inputs["sources"]
        else:
            sources = out / "sources"
            for path in list_pdfs(folder):
                target = sources / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            outputs["sources"] = tracker.log_output("sources", sources, kind="pdf_corpus")

        (out / "pages").mkdir()
        _write_parquet(result.pages, PAGE_FEATURES, out / "pages" / PAGES_FILE)
        outputs["pages"] = tracker.log_output("pages", out / "pages", kind="pages")
        (out / "chunks").mkdir()
        _write_parquet(result.chunks, CHUNK_FEATURES, out / "chunks" / CHUNKS_FILE)
        outputs["chunks"] = tracker.log_output("chunks", out / "chunks", kind="chunks")
    return outputs
