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
