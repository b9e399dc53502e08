"""Retriever benchmark: training examples/s of the retriever stage, index build chunks/s of the base and the tuned
embedder, and MRR@10, Recall@1/5/10, NDCG@10 of base, tuned, BM25 and hybrid on the golden questions.

Runs the retriever stage itself (`execute_stage`, as the pipeline and tests/test_retriever.py do) on the synthetic
data of the corpus: ingest and synth of configs/cpu-demo.yaml run first, or are reused from an earlier run under
.doctune (as bench/train_bench.py does); the retriever stage always runs afresh, with the profile's retriever
settings. Its report holds the comparison, computed by the stage (`doctune.retrieval.compare_retrievers`: ranx's
metrics and its paired Fisher randomization test). The bench times two calls inside the stage from outside, without
changing them: `SentenceTransformerTrainer.train` (examples/s = training pairs x epochs / its seconds) and the
mining of hard negatives.

Index build: a `ChunkIndex` over every chunk, dense, with the base embedder and with the tuned one the stage handed
on, each into an empty cache (so every chunk is embedded; loading the embedder is included); `--builds N` builds
each N times, base first in odd rounds and tuned first in even ones (so a drift of the machine falls on both), and
the fastest build of each counts (default 1 round: each build embeds every chunk, a minute or so on 2 cores). The
BM25 half of the hybrid index is timed once the same way. Writes bench/results/retriever.json and retriever.md.

On 2 CPU cores: about 7 minutes once ingest and synth are reused (4.5 of them the profile's 3 training epochs),
12 with them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

from results_io import write_results

from doctune.config import load_config
from doctune.config.retriever import RANKING_METRICS, RETRIEVERS
from doctune.records import CHUNKS_FILE, RETRIEVER_REPORT_FILE, read_parquet
from doctune.retrieval import ChunkIndex
from doctune.retriever import stage as retriever_stage
from doctune.stages import execute_stage
from doctune.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
TARGET_METRIC = "recall@5"  # the target: tuned significantly above base on Recall@5
ALPHA = 0.05
LABELS = {"mrr@10": "MRR@10", "recall@1": "Recall@1", "recall@5": "Recall@5", "recall@10": "Recall@10", "ndcg@10": "NDCG@10"}


@contextmanager
def timed(owner, name: str, seconds: list[float]):
    """Wrap `owner.name` so that each call's seconds are appended to `seconds`; restored on exit."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    with mock.patch.object(owner, name, wrapper):
        yield


def stage_inputs(config) -> tuple[Tracker, str, dict]:
    """(tracker, pipeline run, the retriever stage's inputs): ingest and synth of the profile, reused when an
    earlier identical run is in the work directory."""
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("bench-retriever")
    ingested = execute_stage("ingest", config, tracker, parent, {})
    documents = {k: ingested.outputs[k] for k in ("chunks", "pages")}
    synth = execute_stage("synth", config, tracker, parent, documents)
    return tracker, parent, documents | {"sft": synth.outputs["sft"], "golden": synth.outputs["golden"]}


def build_seconds(texts: list[str], embedder: str, mode: str = "dense", **kwargs) -> float:
    """Seconds to build a ChunkIndex over `texts` into an empty cache (the embedder's loading included)."""
    with tempfile.TemporaryDirectory(prefix="bench-index-") as cache:
        started = time.perf_counter()
        ChunkIndex(texts, embedder, Path(cache), mode=mode, **kwargs)
        return time.perf_counter() - started


def summarize(
    report: dict, embedder: str, train_seconds: float, mining_seconds: float, stage_seconds: float, builds: dict
) -> dict:
    """The bench's result from the stage's report and the measured seconds. `builds`: what was built -> the
    seconds of each build over report["chunks"] chunks."""
    comparison, training, settings = report["comparison"], report["training"], report["settings"]
    metrics, p_values = comparison["metrics"], comparison["p_values"]
    chunks = report["chunks"]
    batch = min(settings["batch_size"], training["pairs"]) if training["pairs"] else 0
    index_build = {
        name: {"seconds": round(min(seconds), 3), "runs": [round(s, 3) for s in seconds]}
        | ({} if name == "load" else {"chunks_per_second": round(chunks / min(seconds), 1)})
        for name, seconds in builds.items()
    }

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    tuned_vs_base = {
        m: {"ratio": ratio(metrics["tuned"][m], metrics["base"][m]), "p_value": p_values["base vs tuned"][m]}
        for m in RANKING_METRICS
    } if metrics else {}  # fmt: skip
    target = tuned_vs_base.get(TARGET_METRIC)
    meets = None if target is None else bool(
        metrics["tuned"][TARGET_METRIC] > metrics["base"][TARGET_METRIC] and target["p_value"] < ALPHA
    )  # fmt: skip
    return {
        "embedder": embedder,
        "chunks": chunks,
        "golden_questions": comparison["queries"],
        "selected": report["selected"],
        "selected_on": report["selected_on"]["questions"],
        "mining_mode": report["mining"]["mode"],
        "settings": settings,
        "training": {
            "pairs": training["pairs"],
            "hard_negatives": training["hard_negatives"],
            "without_negatives": training["without_negatives"],
            "epochs": settings["epochs"],
            "batch_size": batch,
            "steps": training["steps"],
            "seconds": round(train_seconds, 2),
            "examples_per_second": round(training["pairs"] * settings["epochs"] / train_seconds, 2) if train_seconds else None,
            # the sampler drops the last, partial batch of each epoch: the examples the steps actually saw
            "examples_seen_per_second": round(training["steps"] * batch / train_seconds, 2) if train_seconds else None,
            "mining_seconds": round(mining_seconds, 2),
        },
        "stage_seconds": round(stage_seconds, 1),
        "index_build": index_build,
        "index_builds": min((len(seconds) for name, seconds in builds.items() if name in ("base", "tuned")), default=0),
        "metrics": metrics,
        "p_values": p_values,
        "tuned_vs_base": tuned_vs_base,
        "index_build_tuned_over_base": (
            ratio(index_build["tuned"]["chunks_per_second"], index_build["base"]["chunks_per_second"])
            if {"base", "tuned"} <= set(index_build)
            else None
        ),
        "target": {
            "metric": TARGET_METRIC,
            "rule": f"tuned above base at paired Fisher p < {ALPHA}",
            "meets": meets,
        },
        "cpus": os.cpu_count(),
    }


def p_text(p: float, equals: str = "") -> str:
    """A permutation test's p-value: below 0.001 it is "< 0.001" (ranx draws a finite number of permutations)."""
    return "< 0.001" if p < 0.001 else f"{equals}{p:.3f}"


def notes(result: dict) -> list[str]:
    """What the numbers say about the issue's target, from the numbers themselves."""
    metrics, versus = result["metrics"], result["tuned_vs_base"]
    if not metrics:
        return ["No golden question was usable: nothing measured, and the target cannot be judged."]
    base, tuned, p = metrics["base"][TARGET_METRIC], metrics["tuned"][TARGET_METRIC], versus[TARGET_METRIC]["p_value"]
    verdict = "met" if result["target"]["meets"] else "not met"
    line = f"Target, tuned significantly above base on Recall@5 (p < {ALPHA}): **{verdict}** "
    line += f"({base:.3f} → {tuned:.3f}, p {p_text(p, '= ')})."
    if not result["target"]["meets"] and base >= 0.95:
        line += (
            f" The base embedder already has the source chunk in its top 5 for {base:.1%} of the golden questions (the"
            " extractive teacher's questions share their chunk's words): no room is left for a significant gain there."
        )

    def significant(better: bool) -> list[str]:
        return [
            LABELS[m] for m in RANKING_METRICS
            if (metrics["tuned"][m] > metrics["base"][m]) == better and metrics["tuned"][m] != metrics["base"][m]
            and versus[m]["p_value"] < ALPHA
        ]  # fmt: skip

    above, below = significant(True), significant(False)
    verdicts = f"Tuned significantly above base (p < {ALPHA}) on: {', '.join(above) or 'no metric'}."
    if below:
        verdicts += f" Significantly below base on: {', '.join(below)}."
    return [line, "", verdicts]


BUILDS = {"base": "base embedder", "tuned": "tuned embedder", "bm25": "BM25 (bm25s), embedder loading included"}


def markdown(result: dict) -> list[str]:
    t, builds, metrics, versus = result["training"], result["index_build"], result["metrics"], result["tuned_vs_base"]
    header = " | ".join(LABELS[m] for m in RANKING_METRICS) + " |"
    rule = "|---|" + "---:|" * len(RANKING_METRICS)
    lines = [
        f"Retriever benchmark: bundled all-MiniLM-L6-v2 fine-tuned by the retriever stage (cpu-demo profile: "
        f"{t['epochs']:g} epoch(s), batch {t['batch_size']}, {t['hard_negatives']} mined negative(s) per pair) on the "
        f"synthetic data of ../shared/corpus; {result['golden_questions']} golden questions searched over all "
        f"{result['chunks']} chunks; {result['cpus']} CPUs.",
        "",
        "| retriever | " + header,
        rule,
    ]
    for name in (n for n in RETRIEVERS if n in metrics):
        mark = " (selected)" if name == result["selected"] else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{metrics[name][m]:.3f}" for m in RANKING_METRICS) + " |")
    if versus:
        lines += ["", "| tuned vs base | " + header, rule]
        lines.append("| tuned / base | " + " | ".join(f"{versus[m]['ratio']}" for m in RANKING_METRICS) + " |")
        lines.append("| paired Fisher p | " + " | ".join(p_text(versus[m]["p_value"]) for m in RANKING_METRICS) + " |")
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| training: {t['pairs']} pairs x {t['epochs']:g} epoch(s), {t['steps']} steps | {t['seconds']} s "
        f"({t['examples_per_second']} examples/s; {t['examples_seen_per_second']} examples/s in full batches) |",
        f"| hard negative mining ({result['mining_mode']} search) | {t['mining_seconds']} s |",
    ]
    for name, what in BUILDS.items():
        if b := builds.get(name):
            lines.append(f"| index build, {what} | {b['seconds']} s ({b['chunks_per_second']} chunks/s) |")
    if "load" in builds:
        lines.append(f"| loading the base embedder alone (vectors given) | {builds['load']['seconds']} s |")
    if result["index_build_tuned_over_base"] is not None:
        lines.append(f"| index build chunks/s, tuned / base | {result['index_build_tuned_over_base']} |")
    lines += [f"| retriever stage, whole | {result['stage_seconds']} s |", ""]
    return lines + notes(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, default=REPO / ".doctune", help="where ingest and synth are reused from")
    parser.add_argument("--builds", type=int, default=1, help="index builds per embedder (rounds of base and tuned)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of configs/cpu-demo.yaml")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformerTrainer

    overrides = [f"project.workdir={args.workdir.resolve()}", f"ingest.pdfs={args.pdfs.resolve()}", *args.set]
    config = load_config(REPO / "configs" / "cpu-demo.yaml", overrides)
    tracker, parent, inputs = stage_inputs(config)
    fresh = load_config(REPO / "configs" / "cpu-demo.yaml", [*overrides, "tracking.reuse_stage_results=false"])
    train_s: list[float] = []
    mining_s: list[float] = []
    with ExitStack() as hooks:
        hooks.enter_context(timed(SentenceTransformerTrainer, "train", train_s))
        hooks.enter_context(timed(retriever_stage, "mine_hard_negatives", mining_s))
        result = execute_stage("retriever", fresh, tracker, parent, inputs)
    tracker.close_pipeline_run(parent, succeeded=True)
    report = json.loads((tracker.fetch(result.outputs["report"]) / RETRIEVER_REPORT_FILE).read_text())

    texts = [c["text"] for c in read_parquet(tracker.fetch(inputs["chunks"]) / CHUNKS_FILE)]
    spec, tuned = config.retrieval.embedding_model, tracker.fetch(result.outputs["model"])
    identity = retriever_stage.folder_digest(tuned)
    builds: dict[str, list[float]] = {"base": [], "tuned": []}
    for round_ in range(args.builds):
        for name in ("base", "tuned") if round_ % 2 == 0 else ("tuned", "base"):
            embedder = spec if name == "base" else str(tuned)
            builds[name].append(build_seconds(texts, embedder, identity=None if name == "base" else identity))
    # The BM25 half of the hybrid index: a ChunkIndex always loads its embedder, so that is timed alone too.
    vectors = ChunkIndex(texts, spec, config.project.workdir / "cache").vectors  # cached by now: no new embedding
    builds["load"] = [build_seconds(texts, spec, vectors=vectors)]
    builds["bm25"] = [build_seconds(texts, spec, mode="lexical", vectors=vectors)]

    out = summarize(report, spec, sum(train_s), sum(mining_s), result.seconds, builds)
    write_results(args.out, "retriever", out, markdown(out))


if __name__ == "__main__":
    main()
