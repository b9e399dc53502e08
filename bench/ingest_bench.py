"""Ingest benchmark: pages/s of ingest+chunk against bare pymupdf extraction, in one run.

Prints and writes bench/results/ingest.json and ingest.md:
- bare: `page.get_text()` over every page of the corpus, one process (the baseline);
- extract: doctune's block extraction alone, one process;
- tokenize: the base model's tokenizer (with character offsets, as chunking needs) over the cleaned
  text alone, one thread: the part of ingest that no PDF library does;
- ingest_1 / ingest_2: the whole ingest+chunk (probe, extract, clean, headings, language, tokenize, chunk)
  with 1 and 2 worker processes.
OCR is off so every variant reads the same text layer (OCR'd pages would dominate the time).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import pymupdf
from results_io import write_results

from doctune.config import IngestConfig
from doctune.ingest.pdf import extract_pages
from doctune.ingest.stage import ingest_folder, list_pdfs
from doctune.models import resolve_model

REPO = Path(__file__).resolve().parents[1]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--base-model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process means one core
    tokenizer = resolve_model(args.base_model, REPO / ".doctune" / "cache") / "tokenizer.json"
    files = list_pdfs(args.pdfs)
    pages = 0
    for path in files:
        with pymupdf.open(path) as doc:
            pages += doc.page_count

    def bare() -> None:
        for path in files:
            with pymupdf.open(path) as doc:
                for page in doc:
                    page.get_text()

    def extract() -> None:
        for path in files:
            with pymupdf.open(path) as doc:
                count = doc.page_count
            extract_pages(path, 0, count - 1, "never", "eng", 300, 16)

    def ingest(workers: int):
        config = IngestConfig(pdfs=args.pdfs, workers=workers, ocr="never")
        return lambda: ingest_folder(args.pdfs, config, tokenizer, progress=False)

    from tokenizers import Tokenizer

    texts = {}
    for page in ingest(1)().pages:
        texts.setdefault(page["doc_id"], []).append(page["text"])
    documents = ["\n\n".join(t for t in parts if t) for parts in texts.values()]
    bpe = Tokenizer.from_file(str(tokenizer))

    def tokenize() -> None:
        for text in documents:
            bpe.encode(text, add_special_tokens=False)

    seconds = {
        "bare": best_of(args.repeats, bare),
        "extract": best_of(args.repeats, extract),
        "tokenize": best_of(args.repeats, tokenize),
        "ingest_1": best_of(args.repeats, ingest(1)),
        "ingest_2": best_of(args.repeats, ingest(2)),
    }
    rate = {name: pages / s for name, s in seconds.items()}
    result = {
        "corpus": str(args.pdfs),
        "files": len(files),
        "pages": pages,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "pages_per_second": {k: round(v, 1) for k, v in rate.items()},
        "ratios": {
            "extract_vs_bare": round(rate["extract"] / rate["bare"], 3),
            "tokenize_share_of_ingest_1proc": round(seconds["tokenize"] / seconds["ingest_1"], 3),
            "ingest_1proc_vs_bare": round(rate["ingest_1"] / rate["bare"], 3),
            "speedup_1_to_2_procs": round(rate["ingest_2"] / rate["ingest_1"], 3),
        },
        "targets": {"ingest_1proc_vs_bare": 0.5, "speedup_1_to_2_procs": 1.7},
    }
    lines = [
        f"Ingest benchmark: {len(files)} files, {pages} pages, {os.cpu_count()} CPUs, best of {args.repeats}, OCR off.",
        "",
        "| variant | seconds | pages/s |",
        "|---|---:|---:|",
        *[f"| {k} | {seconds[k]:.3f} | {rate[k]:.0f} |" for k in seconds],
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        *[f"| {k} | {v} | {result['targets'].get(k, '')} |" for k, v in result["ratios"].items()],
    ]
    write_results(args.out, "ingest", result, lines)


if __name__ == "__main__":
    main()
