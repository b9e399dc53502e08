"""Retrieval over chunks: one index for RAG training data, specificity checks and eval.

Dense (sentence-transformers), lexical (BM25, bm25s) or hybrid (reciprocal rank fusion of both). The bundled
embedding model knows English only: a corpus with other languages is searched hybrid, so a French question still
finds its French chunk by its words.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from doctune.cache import Cache
from doctune.models import resolve_embedder

# Languages an embedding model was trained on, where known; a model not listed is taken to cover the corpus.
EMBEDDER_LANGUAGES = {"bundled:all-minilm-l6-v2": frozenset({"en"})}
MODES = ("dense", "lexical", "hybrid")
_RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al.): damps the weight of the first ranks
_FUSION_DEPTH = 100  # ranks of each list that enter the fusion
RANKING_DEPTH = 100  # ranks kept per question when retrievers are compared: the metrics stop at 10


def retrieval_mode(requested: str, embedding_model: str, languages: set[str]) -> tuple[str, str]:
    """(mode, why): `auto` is dense when the embedding model covers every language of the corpus, else hybrid."""
    if requested != "auto":
        return requested, f"retrieval.mode={requested}"
    covered = EMBEDDER_LANGUAGES.get(embedding_model)
    outside = sorted(languages - covered) if covered is not None else []
    if outside:
        return "hybrid", f"{embedding_model} covers {', '.join(sorted(covered))} only; the corpus also holds {', '.join(outside)}"
    return "dense", f"{embedding_model} covers the corpus languages ({', '.join(sorted(languages)) or 'none found'})"


class ChunkIndex:
    def __init__(
        self,
        texts: list[str],
        embedding_model: str,
        cache_dir: Path,
        batch_size: int = 64,
        mode: str = "dense",
        identity: str | None = None,
        vectors: np.ndarray | None = None,
        cache_queries: bool = True,
    ):
        """`identity` names the embedding model's weights in the vector cache where `embedding_model` does not (a
        folder whose content changes between runs: a freshly tuned embedder). `vectors`: the texts' embeddings as
        an index artifact holds them, used instead of embedding the texts again. `cache_queries`: keep each query's
        vector for the index's life (synth asks the same questions several times; a server must not)."""
        from sentence_transformers import SentenceTransformer

        if mode not in MODES:
            raise ValueError(f"retrieval mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.model = SentenceTransformer(str(resolve_embedder(embedding_model, cache_dir)), device="cpu")
        self.batch_size = batch_size
        if vectors is not None and vectors.shape[0] != len(texts):
            raise ValueError(f"{vectors.shape[0]} vectors for {len(texts)} texts")
        self.vectors = (
            vectors if vectors is not None else self._cached_embed(texts, identity or embedding_model, Cache(Path(cache_dir)))
        )
        self._queries: dict[str, np.ndarray] = {}
        self.cache_queries = cache_queries
        self.lexical = None
        if mode != "dense":
            import bm25s

            self.lexical = bm25s.BM25()
            self.lexical.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)

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

    def query_vectors(self, queries: list[str]) -> np.ndarray:
        """Embeddings of queries, each computed once per index where queries are cached."""
        if not self.cache_queries:
            return self.embed(queries)
        missing = list(dict.fromkeys(q for q in queries if q not in self._queries))
        for query, vector in zip(missing, self.embed(missing)):
            self._queries[query] = vector
        if not queries:
            return self.embed([])
        return np.stack([self._queries[q] for q in queries])

    def search(self, queries: list[str], k: int, mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores), each of shape (len(queries), k), best first. Hybrid scores are fused reciprocal
        ranks, not similarities. `mode` searches another way than the index's own (lexical and hybrid need an
        index built lexical or hybrid)."""
        n = self.vectors.shape[0]
        k = min(k, n)
        mode = mode or self.mode
        if mode == "dense":
            return _top(self.query_vectors(queries) @ self.vectors.T, k)
        if self.lexical is None:
            raise ValueError(f"a {self.mode} index cannot search {mode}: build it with mode={mode!r}")
        lexical = self._bm25(queries, n)
        if mode == "lexical":
            return _top(lexical, k)
        fused = np.zeros((len(queries), n), dtype=np.float64)
        depth = min(n, max(k, _FUSION_DEPTH))  # not k's: the top 2 served are the top 2 of the ranking measured
        for scores in (self.query_vectors(queries) @ self.vectors.T, lexical):
            top, _ = _top(scores, depth)
            np.put_along_axis(fused, top, np.take_along_axis(fused, top, axis=1) + 1.0 / (_RRF_K + 1 + np.arange(depth)), axis=1)
        return _top(fused, k)

    def _bm25(self, queries: list[str], n: int) -> np.ndarray:
        """BM25 scores of every chunk for each query (a dense matrix: corpora here have thousands of chunks)."""
        import bm25s

        if not queries:
            return np.zeros((0, n), dtype=np.float64)
        tokens = bm25s.tokenize(queries, stopwords=None, show_progress=False, return_ids=False)
        return np.stack([self.lexical.get_scores(words) if words else np.zeros(n) for words in tokens]).astype(np.float64)


def ranx_run(
    query_ids: list[str], doc_ids: list[str], indices: np.ndarray, scores: np.ndarray, positive_only: bool = False
) -> dict:
    """{query: {doc: score}} from search results, as ranx's Run takes them. `positive_only` leaves out what matched
    nothing (a BM25 score of 0 is no match, not a rank); a query left with nothing is left out (it scores 0)."""
    run = {}
    for q, row, row_scores in zip(query_ids, indices, scores):
        ranked = {doc_ids[int(j)]: float(s) for j, s in zip(row, row_scores) if s > 0 or not positive_only}
        if ranked:
            run[q] = ranked
    return run


def ranx_runs(
    searches: dict[str, tuple[ChunkIndex, str]], questions: list[str], query_ids: list[str], doc_ids: list[str]
) -> dict:
    """name -> ranx run of that (index, mode) for the questions, RANKING_DEPTH deep."""
    runs = {}
    for name, (index, mode) in searches.items():
        top, scores = index.search(questions, RANKING_DEPTH, mode=mode)
        runs[name] = ranx_run(query_ids, doc_ids, top, scores, positive_only=mode == "lexical")
    return runs


def compare_retrievers(qrels: dict[str, dict[str, int]], runs: dict[str, dict], metrics: list[str], seed: int = 13) -> dict:
    """ranx's metrics of each named run on `qrels`, and its paired Fisher randomization test between every pair
    of runs (p-values keyed "a vs b"). No qrels: nothing measured (empty metrics)."""
    from ranx import Qrels, Run, compare, evaluate

    if not qrels:
        return {"queries": 0, "metrics": {}, "p_values": {}}
    qrels_ = Qrels(qrels)
    ranx_runs = {name: Run(run, name=name) if run else Run(name=name) for name, run in runs.items()}  # a run may match nothing
    scores = {}
    for name, run in ranx_runs.items():
        values = evaluate(qrels_, run, metrics, make_comparable=True)
        scores[name] = {m: float(v) for m, v in (values.items() if isinstance(values, dict) else [(metrics[0], values)])}
    result = {"queries": len(qrels), "metrics": scores, "p_values": {}}
    if len(ranx_runs) >= 2:
        report = compare(
            qrels_, list(ranx_runs.values()), metrics=metrics, stat_test="fisher", max_p=0.05, random_seed=seed,
            make_comparable=True,
        )  # fmt: skip
        names = list(ranx_runs)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                pair = report.comparisons[(first, second)]
                result["p_values"][f"{first} vs {second}"] = {m: float(pair[m]["p_value"]) for m in metrics}
    return result


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    indices = np.take_along_axis(top, order, axis=1)
    return indices, np.take_along_axis(scores, indices, axis=1)
