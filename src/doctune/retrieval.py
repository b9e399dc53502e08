"""Dense retrieval over chunks with sentence-transformers: one index for RAG training data and for eval."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from doctune.cache import Cache
from doctune.models import resolve_embedder


class ChunkIndex:
    def __init__(self, texts: list[str], embedding_model: str, cache_dir: Path, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(resolve_embedder(embedding_model, cache_dir)), device="cpu")
        self.batch_size = batch_size
        self.vectors = self._cached_embed(texts, embedding_model, Cache(Path(cache_dir)))

    def _cached_embed(self, texts: list[str], embedding_model: str, cache: Cache) -> np.ndarray:
        """The chunk vectors, computed once per (model, texts): synth and the gate index the same chunks."""
        digest = hashlib.sha256(embedding_model.encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode()).digest())

        def write(scratch: Path) -> None:
            with open(scratch, "wb") as handle:
                np.save(handle, self.embed(texts))

        return np.load(cache.file("embeddings", f"{digest.hexdigest()}.npy", write))

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ).astype(np.float32)

    def search(self, queries: list[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores), each of shape (len(queries), k), best first."""
        vectors = self.embed(queries) if isinstance(queries, list) else queries
        scores = vectors @ self.vectors.T
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        indices = np.take_along_axis(top, order, axis=1)
        return indices, np.take_along_axis(scores, indices, axis=1)
