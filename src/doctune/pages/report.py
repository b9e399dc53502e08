"""The pages report: what went into the dataset, where each document went, sample labels to check against their
page images, and every skipped file, page and label line with its reason."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from doctune.page_schema import keys_of

REPORT_JSON = "pages_report.json"
REPORT_MD = "pages_report.md"
SAMPLES = 6


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(values), "median": int(statistics.median(values)), "max": max(values)}


def _samples(records: dict[str, list[dict]]) -> list[dict]:
    """A few pages to check by eye (no augmented copies): the fullest page of each document first, across splits."""
    plain = [r for rows in records.values() for r in rows if r["augmentation"] is None]
    filled = sorted(plain, key=lambda r: (-sum(1 for v in r["fields"].values() if v not in (None, "", [], {})), r["id"]))
    chosen, documents = [], set()
    for record in filled:  # one per document, then the next fullest
        if record["document"] not in documents and len(chosen) < SAMPLES:
            chosen.append(record)
            documents.add(record["document"])
    chosen += [r for r in filled if r not in chosen][: SAMPLES - len(chosen)]
    return chosen


def summarize(outcome, records: dict[str, list[dict]], mode: str, config, schema: dict) -> dict:
    settings = config.pages
    plain = [r for rows in records.values() for r in rows if r["augmentation"] is None]
    per_split = {}
    for name, rows in records.items():
        per_split[name] = {
            "records": len(rows),
            "pages": sum(r["augmentation"] is None for r in rows),
            "augmented": sum(r["augmentation"] is not None for r in rows),
            "documents": sorted({r["document"] for r in rows}),
        }
    used = sorted({r["document"] for r in plain})
    documents = []
    for document in outcome.documents:
        pages = [r for r in plain if r["document"] == document.name]
        sides = sorted({name for name, rows in records.items() for r in rows if r["document"] == document.name})
        row = {"document": document.name, "sha256": document.sha256, "pages": document.pages, "used_pages": len(pages)}
        documents.append(row | {"splits": sides})
    if mode == "document":
        split_note = "by document: every document's pages are in one split"
    elif mode == "page":
        split_note = (
            f"by page: only {len(used)} document(s), too few to split by document (3 needed), so their pages are "
            "split instead; pages of one document are on several sides"
        )
    else:
        split_note = "nothing to split"
    return {
        "source": str(settings.pdfs or config.ingest.pdfs),
        "labels": str(settings.labels) if settings.labels else None,
        "schema": str(settings.schema_file) if settings.schema_file else "built-in self-supervised schema",
        "pdfs_found": outcome.found,
        "documents_read": len(outcome.documents),
        "documents_used": used,
        "pages": len(plain),
        "records": sum(len(rows) for rows in records.values()),
        "augmented": sum(s["augmented"] for s in per_split.values()),
        "augmentations": dict(sorted(Counter(r["augmentation"] for r in records["train"] if r["augmentation"]).items())),
        "sources": dict(sorted(Counter(r["source"] for r in plain).items())),
        "split_mode": mode,
        "split_note": split_note,
        "splits": per_split,
        "documents": documents,
        "max_pages_per_document": settings.max_pages_per_document,
        "labeled_pages_left_out": outcome.left_out,
        "render": {
            "dpi": settings.render.dpi,
            "max_pixels": settings.render.max_pixels,
            "rendered_now": outcome.rendered,
            "from_cache": len(plain) - outcome.rendered if len(plain) >= outcome.rendered else 0,
            "width": _stats([r["width"] for r in plain]),
            "height": _stats([r["height"] for r in plain]),
        },
        "skipped_by_kind": dict(sorted(Counter(s["kind"] for s in outcome.skipped).items())),
        "skipped": outcome.skipped,
        "samples": _samples(records),
        "schema_keys": keys_of(schema),
    }


def _cell(value: object, limit: int = 90) -> str:
    """A Markdown table cell: one line, '|' escaped, long values cut with an ellipsis."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(summary: dict) -> str:
    s = summary
    lines = [
        "# Pages report",
        "",
        f"{s['pages']} pages from {len(s['documents_used'])} of {s['pdfs_found']} PDF files, {s['records']} records with "
        f"{s['augmented']} augmented copies; {len(s['skipped'])} items skipped.",
        "",
        f"- labels: {s['labels'] or 'self-supervised, from each page’s text layer'}",
        f"- schema: {s['schema']}",
        f"- split: {s['split_note']}",
        f"- sources: {', '.join(f'{k}: {v}' for k, v in s['sources'].items()) or 'none'}",
        f"- augmentations (train only): {', '.join(f'{k}: {v}' for k, v in s['augmentations'].items()) or 'none'}",
        f"- rendered at {s['render']['dpi']} dpi, at most {s['render']['max_pixels']} pixels: width "
        f"{s['render']['width']['min']}–{s['render']['width']['max']} (median {s['render']['width']['median']}), height "
        f"{s['render']['height']['min']}–{s['render']['height']['max']} (median {s['render']['height']['median']}); "
        f"{s['render']['rendered_now']} rendered now, the rest from the cache",
    ]
    if s["max_pages_per_document"]:
        lines.append(f"- at most {s['max_pages_per_document']} pages per document (pages.max_pages_per_document)")
    if s["labeled_pages_left_out"]:
        lines.append(f"- {s['labeled_pages_left_out']} labeled pages left out beyond that cap")
    lines += ["", "## Splits", "", "| split | records | pages | augmented | documents |", "|---|---:|---:|---:|---|"]
    for name, row in s["splits"].items():
        documents = _cell(", ".join(row["documents"]), 400)
        lines.append(f"| {name} | {row['records']} | {row['pages']} | {row['augmented']} | {documents} |")
    lines += ["", "## Documents", "", "| document | pages | used | split |", "|---|---:|---:|---|"]
    for row in s["documents"]:
        lines.append(f"| {_cell(row['document'])} | {row['pages']} | {row['used_pages']} | {', '.join(row['splits']) or '-'} |")
    keys = s["schema_keys"]
    if s["samples"]:
        lines += [
            "",
            "## Sample labels",
            "",
            "Check these against their page images (the image path is in the dataset).",
            "",
            "| id | image | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for record in s["samples"]:
            values = " | ".join(_cell(record["fields"].get(key)) for key in keys)
            lines.append(f"| {_cell(record['id'])} | {record['image']} | {values} |")
    lines += ["", "## Skipped", ""]
    if not s["skipped"]:
        lines.append("Nothing was skipped.")
    else:
        lines.append(", ".join(f"{kind}: {n}" for kind, n in s["skipped_by_kind"].items()))
        lines += ["", "| file | page | line | reason |", "|---|---|---:|---|"]
        for item in s["skipped"]:
            page = item["page"] if item["page"] is not None else ""
            if item.get("document"):  # a label line: the page it labels is in its PDF, not in the labels file
                page = f"{item['document']} p{page}"
            line = item["line"] if item["line"] is not None else ""
            lines.append(f"| {_cell(item['file'])} | {page} | {line} | {_cell(item['reason'], 300)} |")
    return "\n".join(lines) + "\n"


def write(folder: Path, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / REPORT_MD).write_text(markdown(summary), encoding="utf-8")


def where(item: dict) -> str:
    """A skipped item's place: the file, then its page or line."""
    if item.get("document"):
        return f"{item['file']} line {item['line']} ({item['document']} page {item['page']})"
    return item["file"] + (f" page {item['page']}" if item["page"] else "") + (f" line {item['line']}" if item["line"] else "")


def nothing_usable(summary: dict, source: Path, run_id: str) -> str:
    """One line: what was found, why nothing could be used, and where the whole report is."""
    kinds = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in summary["skipped_by_kind"].items()) or "no page labeled"
    first = "; ".join(f"{where(item)}: {item['reason']}" for item in summary["skipped"][:3])
    more = "; …" if len(summary["skipped"]) > 3 else ""
    return (
        f"no usable page: {summary['pdfs_found']} PDF file(s) under {source}, {summary['documents_read']} readable; "
        f"skipped: {kinds}{f' ({first}{more})' if first else ''}; every item and why: report/{REPORT_MD} of MLflow run {run_id}"
    )
