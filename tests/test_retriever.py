"""The retriever stage: training pairs, hard-negative mining, and the tuned embedder against the base on the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from doctune.records import INDEX_FILE, RETRIEVER_REPORT_FILE
from doctune.retrieval import ChunkIndex
from doctune.retriever.stage import Pair, mine_hard_negatives, training_chunks, training_pairs
from doctune.stages import execute_stage

CHUNKS = [
    "To install a package, run apt install followed by the package name.",
    "Packages are installed with apt install; apt remove uninstalls them again.",
    "To install a package, run apt install followed by the package name.",  # the same text as chunk 0
    "The kernel boots from the partition marked active in the boot loader.",
    "Package installation needs root rights: run the installer with sudo.",
    "Mount the installation media before copying the firmware files.",
]


def record(question: str, chunk_id: str, form: str = "rag", **meta) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "..."}]
    return {"messages": messages, "meta": {"question": question, "chunk_id": chunk_id, "form": form, **meta}}


def test_training_pairs_are_one_per_question_with_its_source_chunk_and_bad_records_are_listed():
    records = [
        record("How is a package installed?", "c0", evidence="run apt install", context_chunk_ids=["c0", "c3"]),
        record("How is a package installed?", "c0", form="abstention", withheld_answer="run apt install"),
        {"messages": [], "meta": {"form": "rehearsal", "question": "Tell me a joke."}},
        {"messages": [], "meta": {"question": "Which partition boots?"}} | {"_line": 4},
        record("What does apt remove do?", "c9") | {"_line": 5},
    ]
    skipped: list[dict] = []
    pairs = training_pairs(records, {"c0", "c1", "c3"}, Path("train.jsonl"), skipped)
    assert pairs == [Pair("How is a package installed?", "c0", "run apt install")]
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (4, "no meta.question and meta.chunk_id: not a (question, source chunk) pair"),
        (5, "meta.chunk_id 'c9' is not a chunk of this corpus"),
    ]
    assert training_chunks(records) == {"c0", "c3", "c9"}


def test_hard_negatives_rank_high_but_never_are_the_positive_its_text_or_a_chunk_holding_the_answer(tmp_path):
    ids = [f"c{i}" for i in range(len(CHUNKS))]
    index = ChunkIndex(CHUNKS, "bundled:all-minilm-l6-v2", tmp_path)
    pairs = [
        Pair("How do I install a package with apt?", "c0", "run apt install followed by the package name"),
        Pair("Which partition does the kernel boot from?", "c3", ""),
    ]
    allowed = set(ids) - {"c5"}
    negatives = mine_hard_negatives(index, pairs, ids, CHUNKS, allowed, count=2, depth=6)
    first, second = negatives
    # Not c0 (the positive), not c2 (its text again); c1 and c4 are about installing, yet do not hold the answer.
    assert set(first) == {1, 4}
    assert 3 not in second and 5 not in second and len(second) == 2  # c5 is not a training chunk
    holding = Pair("How do I install a package with apt?", "c0", "apt install")  # c1 holds "apt install" too
    assert 1 not in mine_hard_negatives(index, [holding], ids, CHUNKS, allowed, count=3, depth=6)[0]
    assert mine_hard_negatives(index, pairs, ids, CHUNKS, allowed, count=0, depth=6) == [[], []]


def test_a_small_corpus_that_asks_the_same_chunks_again_still_trains(tmp_path):
    """Many questions on few chunks: no batch of 32 pairs without a repeated passage exists, so the batch shrinks
    until steps are taken (it used to train 0 steps and hand on the base embedder as "tuned")."""
    from doctune.config import RetrieverConfig
    from doctune.models import resolve_embedder
    from doctune.retriever.stage import train_embedder

    asked = [0, 1, 3, 4]  # chunks 0-4 hold distinct text; 5 stays a negative
    pairs = [Pair(f"Question {i} about chunk {c}?", f"c{c}", "") for i, c in enumerate(asked * 10)]
    negatives = [[5] for _ in pairs]
    position = {f"c{i}": i for i in range(len(CHUNKS))}
    cfg = RetrieverConfig(batch_size=32, epochs=1.0)
    base = resolve_embedder("bundled:all-minilm-l6-v2", tmp_path)
    training = train_embedder(base, pairs, negatives, CHUNKS, position, cfg, tmp_path / "tuned")
    assert training["steps"] > 0 and training["batch_size"] < 32 and "not_trained" not in training
    assert training["hard_negatives"] == 0  # every pair's negative is chunk 5: no two can share a batch with it
    assert (tmp_path / "tuned").is_dir()


@pytest.mark.real_model
def test_the_tuned_embedder_ranks_the_source_chunk_higher_than_the_base_on_the_corpus(corpus_synth):
    """On the shared corpus's golden questions (chunks no training pair comes from), ranked over the whole corpus.
    Recall@5 of the base embedder is near 1 there (extractive questions share the chunk's words), so the paired
    test is on the first ranks, which the two-passage contexts depend on."""
    config, tracker, synth = corpus_synth  # the library defaults (256-token passages), as the pipeline trains
    # One pass over the pairs instead of three: the same significance on the first ranks at a third of the steps.
    config = config.model_copy(update={"retriever": config.retriever.model_copy(update={"epochs": 1.0})})
    parent = tracker.client.get_run(synth.run_id).data.tags["mlflow.parentRunId"]
    (ingest,) = tracker.stage_runs(parent, "ingest")
    documents = tracker.outputs_of(ingest)
    inputs = {
        "chunks": documents["chunks"],
        "pages": documents["pages"],
        "sft": synth.outputs["sft"],
        "golden": synth.outputs["golden"],
    }
    result = execute_stage("retriever", config, tracker, parent, inputs)
    report = json.loads((tracker.fetch(result.outputs["report"]) / RETRIEVER_REPORT_FILE).read_text())
    comparison = report["comparison"]
    base, tuned = comparison["metrics"]["base"], comparison["metrics"]["tuned"]
    assert comparison["queries"] >= 100
    for metric in ("mrr@10", "recall@1"):
        assert tuned[metric] > base[metric] and comparison["p_values"]["base vs tuned"][metric] < 0.05, metric
    assert report["selected"] in ("tuned", "hybrid") and report["training"]["without_negatives"] == 0
    index = tracker.fetch(result.outputs["index"])
    meta = json.loads((index / INDEX_FILE).read_text())
    vectors = np.load(index / "embeddings.npy")
    assert meta["embedder"] == "model" and vectors.shape[0] == len(meta["chunk_ids"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
