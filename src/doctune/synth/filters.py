"""Quality filters over generated QA. Each returns what it kept; the caller counts what it dropped."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from datasketch import MinHash, MinHashLSH

from doctune.synth.extractive import QA

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_dedup(items: list[QA]) -> list[QA]:
    seen: set[tuple[str, ...]] = set()
    kept = []
    for qa in items:
        key = (*words(qa.question), "||", *words(qa.answer))
        if key not in seen:
            seen.add(key)
            kept.append(qa)
    return kept


def minhash_dedup(items: list[QA], threshold: float, permutations: int, seed: int = 1) -> list[QA]:
    """Drop near-duplicates by Jaccard similarity of word 3-gram shingles of question and answer."""
    lsh = MinHashLSH(threshold=threshold, num_perm=permutations)
    kept = []
    for i, qa in enumerate(items):
        tokens = [*words(qa.question), "||", *words(qa.answer)]
        shingles = {" ".join(tokens[j : j + 3]).encode() for j in range(max(1, len(tokens) - 2))}
        signature = MinHash(num_perm=permutations, seed=seed)
        signature.update_batch(list(shingles))
        if lsh.query(signature):
            continue
        lsh.insert(str(i), signature)
        kept.append(qa)
    return kept


def embedding_dedup(items: list[QA], vectors: np.ndarray, threshold: float, seed: int = 1) -> list[QA]:
    """Drop questions whose embedding is within `threshold` cosine of a kept one.

    Candidates come from random-hyperplane LSH (several tables of sign bits), so the work grows near-linearly;
    each candidate pair is then checked exactly.
    """
    if len(items) == 0:
        return []
    rng = np.random.default_rng(seed)
    tables, bits = 8, 10
    planes = rng.standard_normal((tables, bits, vectors.shape[1])).astype(np.float32)
    codes = ((np.einsum("tbd,nd->tnb", planes, vectors) > 0) * (1 << np.arange(bits))).sum(axis=2)  # (tables, n)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(tables)]
    kept_idx: list[int] = []
    for i in range(len(items)):
        candidates = {j for t in range(tables) for j in buckets[t].get(int(codes[t, i]), ())}
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64)
            if float((vectors[idx] @ vectors[i]).max()) >= threshold:
                continue
        kept_idx.append(i)
        for t in range(tables):
            buckets[t].setdefault(int(codes[t, i]), []).append(i)
    return [items[i] for i in kept_idx]


def length_filter(items: list[QA]) -> list[QA]:
    """Drop empty or truncated answers and the longest 1% of questions and of answers (outliers)."""
    if not items:
        return []
    q_cap = np.percentile([len(qa.question) for qa in items], 99)
    a_cap = np.percentile([len(qa.answer) for qa in items], 99)
    return [
        qa
        for qa in items
        if qa.answer.strip()
        and not qa.answer.rstrip().endswith(("...", "…"))
        and len(qa.question) <= q_cap
        and len(qa.answer) <= a_cap
    ]


def leakage_filter(items: list[QA]) -> list[QA]:
    """Drop items whose question already states the answer."""
    kept = []
    for qa in items:
        answer, question = words(qa.answer), words(qa.question)
        joined_a, joined_q = " ".join(answer), " ".join(question)
        if answer and joined_a in joined_q:
            continue
        if len(answer) >= 4 and sum(w in set(question) for w in answer) >= 0.8 * len(answer):
            continue
        kept.append(qa)
    return kept


def language_filter(items: list[QA], chunk_lang: Callable[[str], str], languages: list[str]) -> list[QA]:
    return [qa for qa in items if chunk_lang(qa.chunk_id) in languages]
