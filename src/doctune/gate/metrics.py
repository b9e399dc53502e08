"""Scores of one answer against its reference, the capability-probe checks, retrieval metrics, and the statistics
the gate's verdict rests on: a paired test, bootstrap intervals, the smallest difference a set can detect."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable
from statistics import NormalDist

import numpy as np

from doctune.structured import json_object, schema_match

ABSTENTION_MARKERS = (
    "cannot answer",
    "can't answer",
    "not able to answer",
    "unable to answer",
    "does not contain",
    "doesn't contain",
    "not in the provided",
    "not mentioned",
    "no information",
    "i don't know",
    "i do not know",
    "ne peux pas répondre",
    "je ne sais pas",
    "nicht beantworten",
    "weiß ich nicht",
    "no puedo responder",
    "no lo sé",
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred) & set(ref))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalised tokens."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def abstains(prediction: str, sentences: Iterable[str]) -> bool:
    """Whether a reply declines to answer: one of the trained abstention sentences (any language) or a common
    paraphrase of one."""
    if isinstance(sentences, str):
        raise TypeError("abstains takes the abstention sentences, not one string")
    text, normalized = " ".join(prediction.lower().split()), normalize(prediction)
    return any(normalize(s) in normalized for s in sentences) or any(marker in text for marker in ABSTENTION_MARKERS)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def probe_passes(reply: str, check: dict) -> bool:
    """Automatic scoring of one capability probe (see gate/data/capability_probes.jsonl)."""
    kind = check["type"]
    if kind == "number":
        found = _NUMBER.search(reply)
        return found is not None and abs(float(found.group().replace(",", "")) - check["value"]) < 1e-6
    if kind == "contains_any":
        if check.get("case_sensitive"):
            return any(v in reply for v in check["values"])
        return any(re.search(rf"\b{re.escape(normalize(v))}\b", normalize(reply)) for v in check["values"])
    if kind == "exact":
        return reply.strip().rstrip(".!").strip() == check["value"]
    if kind == "starts_with":
        return reply.strip().split(" ", 1)[0] == check["value"]
    if kind == "item_count":
        items = [i for i in reply.strip().rstrip(".").split(check["separator"]) if i.strip()]
        return "\n" not in reply.strip() and len(items) == check["value"]
    if kind == "json":
        return schema_match(json_object(reply), check["schema"])
    raise ValueError(f"probe check type {kind!r} is unknown")


def paired_randomization_p(candidate: list[float], reference: list[float], permutations: int = 10000, seed: int = 0) -> float:
    """One-sided p-value that the candidate is worse than the reference on these paired per-example scores
    (sign-flip randomization of the differences); small p: significantly worse."""
    diffs = np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float)
    if len(diffs) == 0 or not diffs.any():
        return 1.0
    observed = diffs.mean()
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(permutations, len(diffs)))
    null = (signs * np.abs(diffs)).mean(axis=1)
    return float((np.sum(null <= observed) + 1) / (permutations + 1))


# -- statistics over items -------------------------------------------------------------------------------------

# Each per-item metric and the per_example list it is the mean of (0/1 lists for rates, scores for F1 and ROUGE).
OPTIONAL_METRICS = frozenset({"closed_book_f1", "production_f1"})  # measured only where their items exist
PER_ITEM_METRICS = {
    "golden_f1": "golden_f1",
    "closed_book_f1": "closed_book_f1",
    "production_f1": "production_f1",
    "golden_exact_match": "golden_exact_match",
    "golden_rouge_l": "golden_rouge_l",
    "citation_recall": "source_cited",  # answers that cite a passage holding their answer
    "false_abstention_rate": "golden_abstained",
    "abstention_accuracy": "abstained",
    "hallucination_rate": "hallucinated",
    "capability_accuracy": "capability",
    "format_compliance": "format",
}


def bootstrap_ci(values, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: items drawn with replacement `resamples` times; (nan, nan)
    without items."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    per_batch = max(1, 4_000_000 // x.size)  # bounds the index matrix of a large set
    means = np.concatenate(
        [x[rng.integers(0, x.size, size=(min(per_batch, resamples - s), x.size))].mean(axis=1)
         for s in range(0, resamples, per_batch)]
    )  # fmt: skip
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def interval(values, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean, 95% bootstrap interval and number of items of one per-item metric."""
    low, high = bootstrap_ci(values, resamples, seed)
    return {"mean": float(np.mean(values)) if len(values) else math.nan, "ci_low": low, "ci_high": high, "n": len(values)}


def metric_intervals(per_example: dict[str, list], resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """`interval` of every per-item metric a model's per_example lists hold (closed-book F1 may be switched off)."""
    return {
        metric: interval(per_example[key], resamples, seed) for metric, key in PER_ITEM_METRICS.items() if per_example.get(key)
    }


def paired_difference(candidate, reference, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean per-item difference candidate - reference with its paired bootstrap interval (the same items drawn
    for both, so what the items share cancels)."""
    diffs = _paired(candidate, reference)
    return interval(diffs, resamples, seed)


def ratio_shortfall_bound(
    candidate: tuple[list, list],
    reference: tuple[list, list],
    factor: float,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> float:
    """One-sided upper `level` bound of candidate ratio - factor x reference ratio, each a ratio of per-item sums
    (numerators, denominators; 0 where the denominator sums to 0), the same items drawn for both (paired bootstrap).
    Below 0: the candidate is significantly below `factor` x the reference."""
    cn, cd, rn, rd = (np.asarray(v, dtype=float) for v in (*candidate, *reference))
    if cn.size == 0:
        return math.nan
    draws = np.random.default_rng(seed).integers(0, cn.size, size=(resamples, cn.size))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        n, d = num[draws].sum(axis=1), den[draws].sum(axis=1)
        return np.divide(n, d, out=np.zeros_like(n), where=d > 0)

    return float(np.percentile(ratio(cn, cd) - factor * ratio(rn, rd), level * 100))


WORST_CASE_SD = 0.5


def paired_sd(candidate, reference, binary: bool = False) -> float:
    """Standard deviation of the per-item differences candidate - reference. Where they do not vary (a constant
    shift, fewer than two items), that of two independent samples with these spreads: sqrt(var_c + var_r), for 0/1
    outcomes sqrt(2 p (1 - p)) with p the pooled rate; where nothing varies, WORST_CASE_SD."""
    diffs = _paired(candidate, reference)
    if diffs.size >= 2 and (sd := float(np.std(diffs, ddof=1))) > 1e-12:
        return sd
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if binary:
        p = float(np.concatenate([c, r]).mean()) if c.size else 0.0
        sd = math.sqrt(2 * p * (1 - p))
    else:
        sd = math.sqrt(_var(c) + _var(r))
    # No spread observed at all (two models scoring 0 everywhere) says nothing about the spread a real difference
    # would have: take the largest a score in [0, 1] can have, so a degenerate set never passes for a powerful one.
    return sd if sd > 1e-12 else WORST_CASE_SD


def min_detectable_difference(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest true mean difference a one-sided paired test at `alpha` finds with probability `power`, for
    per-item differences of standard deviation `sd` over `n` items (normal approximation); inf below two items."""
    if n < 2:
        return math.inf
    z = NormalDist().inv_cdf
    return (z(1 - alpha) + z(power)) * sd / math.sqrt(n)


def group_scores(candidate, reference, labels: list[str], resamples: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per label (question type, document, language): n, candidate and reference mean, the candidate's interval;
    labels in order of first appearance."""
    out = {}
    for label in dict.fromkeys(labels):
        rows = [i for i, item_label in enumerate(labels) if item_label == label]
        cand, ref = [candidate[i] for i in rows], [reference[i] for i in rows]
        low, high = bootstrap_ci(cand, resamples, seed)
        out[label] = {"n": len(rows), "candidate": float(np.mean(cand)), "reference": float(np.mean(ref)), "ci_low": low,
                      "ci_high": high}  # fmt: skip
    return out


def _paired(candidate, reference) -> np.ndarray:
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if c.shape != r.shape:
        raise ValueError(f"paired scores need the same items: {c.size} vs {r.size}")
    return c - r


def _var(x: np.ndarray) -> float:
    return float(np.var(x, ddof=1)) if x.size >= 2 else 0.0
