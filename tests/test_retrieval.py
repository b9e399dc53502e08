"""The chunk index shared by synth (RAG contexts) and the gate (retrieval quality), with the bundled MiniLM."""

from __future__ import annotations

import numpy as np

from doctune.retrieval import ChunkIndex

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
