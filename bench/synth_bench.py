"""Synth benchmark: extractive generation + filtering throughput on the corpus, and dedup growth from 10k to 100k.

Writes bench/results/synth.json and synth.md. The dedup runs (exact, MinHash LSH, embedding LSH, including
computing the embeddings) use examples built from the corpus's own sentences: random templates and
word windows, so they hold exact and near duplicates as generated data does.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

from results_io import write_results

from doctune.config import IngestConfig, load_config
from doctune.ingest.stage import ingest_folder
from doctune.models import resolve_model
from doctune.retrieval import ChunkIndex
from doctune.synth import filters
from doctune.synth.extractive import QA, extractive_questions, fold, sentences
from doctune.synth.languages import ENGLISH
from doctune.synth.stage import apply_filters

REPO = Path(__file__).resolve().parents[1]


def synthetic_examples(chunks: list[dict], n: int, seed: int = 0) -> list[QA]:
    rng = random.Random(seed)
    pool = [(c["chunk_id"], fold(c["text"][a:b])) for c in chunks for a, b in sentences(c["text"])]
    out = []
    for _ in range(n):
        chunk_id, sentence = rng.choice(pool)
        tokens = sentence.split()
        start = rng.randrange(max(1, len(tokens) - 4))
        words = " ".join(tokens[start : start + rng.randint(2, 6)])
        template = rng.choice(ENGLISH.templates["section"])
        out.append(QA(question=template.format(title=words), answer=sentence, chunk_id=chunk_id, qtype="section"))
    return out


def dedup(items: list[QA], index: ChunkIndex) -> tuple[int, float]:
    started = time.perf_counter()
    kept = filters.exact_dedup(items)
    kept = filters.minhash_dedup(kept, 0.8, 64)
    kept = filters.embedding_dedup(kept, index.embed([q.question for q in kept]), 0.95)
    return len(kept), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = load_config(REPO / "configs" / "cpu-demo.yaml", [f"project.workdir={REPO / '.doctune'}"])
    cache = config.project.workdir / "cache"
    tokenizer = resolve_model(config.model.base_model, cache) / "tokenizer.json"
    ingested = ingest_folder(args.pdfs, IngestConfig(pdfs=args.pdfs, ocr="never"), tokenizer, progress=False)
    chunks = ingested.chunks
    lang = {p["doc_id"]: p["lang"] for p in ingested.pages}
    lang_of = {c["chunk_id"]: lang[c["doc_id"]] for c in chunks}
    index = ChunkIndex([], config.retrieval.embedding_model, cache)

    started = time.perf_counter()
    qas = [qa for chunk in chunks for qa in extractive_questions(chunk, config.synth.max_questions)]
    generated_s = time.perf_counter() - started
    kept, counts = apply_filters(qas, config, lang_of, index)
    total_s = time.perf_counter() - started

    small, large = args.sizes
    kept_small, small_s = dedup(synthetic_examples(chunks, small), index)
    kept_large, large_s = dedup(synthetic_examples(chunks, large), index)
    result = {
        "chunks": len(chunks),
        "generated": len(qas),
        "kept": len(kept),
        "generation_seconds": round(generated_s, 3),
        "generation_and_filter_seconds": round(total_s, 3),
        "examples_per_second": round(len(qas) / total_s, 1),
        "filters": counts,
        "dedup": {
            str(small): {"seconds": round(small_s, 2), "kept": kept_small},
            str(large): {"seconds": round(large_s, 2), "kept": kept_large},
        },
        "dedup_growth": round(large_s / small_s, 2),
        "dedup_growth_target": 12 * (large / small) / 10,
        "cpus": os.cpu_count(),
    }
    lines = [
        f"Synth benchmark: {len(chunks)} chunks of ../shared/corpus, extractive teacher, {os.cpu_count()} CPUs.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| questions generated | {len(qas)} |",
        f"| kept after filters | {len(kept)} |",
        f"| generation + filtering | {total_s:.2f} s ({result['examples_per_second']} examples/s) |",
        f"| dedup {small:,} examples | {small_s:.2f} s ({kept_small:,} kept) |",
        f"| dedup {large:,} examples | {large_s:.2f} s ({kept_large:,} kept) |",
        f"| growth {small:,} -> {large:,} (target <= {result['dedup_growth_target']:g}x) | {result['dedup_growth']}x |",
    ]
    write_results(args.out, "synth", result, lines)


if __name__ == "__main__":
    main()
