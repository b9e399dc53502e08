"""The chunk index shared by synth (RAG contexts) and the gate (retrieval quality), with the bundled MiniLM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from doctune.retrieval import ChunkIndex, compare_retrievers, ranx_run

CHUNKS = [
    "To install a package, run apt install followed by the package name.",
    "The kernel boots from the partition marked active in the boot loader.",
    "Mount the installation media before copying the firmware files.",
]


def test_search_ranks_the_chunk_that_answers_first_and_vectors_are_computed_once(tmp_path):
    index = ChunkIndex(CHUNKS, "bundled:all-minilm-l6-v2", tmp_path)
    indices, scores = index.search(["How do I install a package?"], k=2)
    assert indices[0][0] == 0 and scores[0][0] > scores[0][1]
    (cached,) = (tmp_path / "embeddings").glob("*.npy")
    # The same chunks again (the gate after synth): the stored vectors, not a second encoding pass.
    stamp = cached.stat().st_mtime_ns
    again = ChunkIndex(CHUNKS, "bundled:all-minilm-l6-v2", tmp_path)
    np.testing.assert_array_equal(again.vectors, index.vectors)
    assert cached.stat().st_mtime_ns == stamp
    # Other chunks get their own vectors.
    ChunkIndex(CHUNKS[:2], "bundled:all-minilm-l6-v2", tmp_path)
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 2


def test_a_language_the_embedding_model_misses_is_searched_by_its_words_too(tmp_path):
    from doctune.retrieval import retrieval_mode

    chunks = [
        "Le gestionnaire de paquets installe les dépendances manquantes automatiquement.",
        "Les fichiers de configuration du système se trouvent dans le répertoire /etc.",
        "Der Kernel startet von der Partition, die im Bootloader als aktiv markiert ist.",
        "Das Installationsmedium wird vor dem Kopieren der Firmware eingehängt.",
    ]
    mode, why = retrieval_mode("auto", "bundled:all-minilm-l6-v2", {"fr", "de"})
    assert mode == "hybrid" and "covers en only" in why
    assert retrieval_mode("auto", "bundled:all-minilm-l6-v2", {"en"})[0] == "dense"
    assert retrieval_mode("auto", "/models/multilingual-e5", {"fr"})[0] == "dense"  # unknown coverage: trusted
    questions = ["Où se trouvent les fichiers de configuration du système ?", "Welche Partition startet der Kernel?"]
    hybrid = ChunkIndex(chunks, "bundled:all-minilm-l6-v2", tmp_path, mode=mode)
    assert [row[0] for row in hybrid.search(questions, k=2)[0]] == [1, 2]
    lexical = ChunkIndex(chunks, "bundled:all-minilm-l6-v2", tmp_path, mode="lexical")
    assert [row[0] for row in lexical.search(questions, k=1)[0]] == [1, 2]
    for mode in ("dense", "lexical", "hybrid"):  # no questions (an eval set left empty): nothing ranked, no error
        assert hybrid.search([], k=2, mode=mode)[0].shape == (0, 2)


def test_ranx_metrics_of_a_known_run_and_a_paired_test_between_every_pair():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d1": 0.9, "d3": 0.5}, "q2": {"d3": 0.9, "d2": 0.5}}  # relevant at rank 1 and rank 2
    scores = compare_retrievers(qrels, {"dense": run}, ["mrr@10", "recall@1", "recall@2", "ndcg@2"])
    row = scores["metrics"]["dense"]
    assert row["mrr@10"] == pytest.approx((1 + 1 / 2) / 2) and row["recall@1"] == pytest.approx(0.5)
    assert row["recall@2"] == pytest.approx(1.0) and row["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert scores["p_values"] == {}
    miss = {"q1": {"d3": 1.0}, "q2": {"d3": 1.0}}
    compared = compare_retrievers(qrels, {"a": run, "b": miss, "c": run, "d": {"q1": {"d1": 1.0}}}, ["mrr@10"])
    assert compared["metrics"]["d"]["mrr@10"] == pytest.approx(0.5)  # q2, unanswered, counts as a miss
    assert set(compared["p_values"]) == {"a vs b", "a vs c", "a vs d", "b vs c", "b vs d", "c vs d"}
    assert compared["p_values"]["a vs c"]["mrr@10"] == 1.0 and 0 < compared["p_values"]["a vs b"]["mrr@10"] <= 1


def test_a_bm25_row_that_matched_nothing_ranks_nothing():
    indices, scores = np.array([[2, 0, 1], [1, 0, 2]]), np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert ranx_run(["q1", "q2"], ["a", "b", "c"], indices, scores, positive_only=True) == {"q1": {"c": 3.0, "a": 1.0}}
    assert len(ranx_run(["q1"], ["a", "b", "c"], indices[:1], -scores[:1])["q1"]) == 3  # cosine scores may be negative


def test_a_retriever_that_matches_nothing_scores_zero_and_no_questions_measure_nothing():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    compared = compare_retrievers(qrels, {"bm25": {}, "dense": {"q1": {"d1": 0.9}}}, ["mrr@10", "recall@5"])
    assert compared["metrics"]["bm25"] == {"mrr@10": 0.0, "recall@5": 0.0}
    assert compared["metrics"]["dense"]["mrr@10"] == pytest.approx(0.5)
    assert compare_retrievers({}, {"dense": {}}, ["mrr@10"]) == {"queries": 0, "metrics": {}, "p_values": {}}
