"""Scores of one answer against its reference, the capability-probe checks, retrieval metrics, a paired test."""

from __future__ import annotations

import json
import re
import string

import numpy as np

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


def abstains(prediction: str, abstention: str) -> bool:
    """Whether a reply declines to answer: the trained abstention sentence or a common paraphrase of it."""
    text = " ".join(prediction.lower().split())
    return normalize(abstention) in normalize(prediction) or any(marker in text for marker in ABSTENTION_MARKERS)


def json_object(text: str) -> dict | None:
    """The JSON object a reply holds (code fences and surrounding prose allowed), or None."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    for candidate in (body, body[body.find("{") : body.rfind("}") + 1] if "{" in body else ""):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def schema_match(value: dict | None, schema: dict[str, str]) -> bool:
    """Exactly the schema's keys, each of its type (booleans are not integers)."""
    if value is None or set(value) != set(schema):
        return False
    for key, kind in schema.items():
        item = value[key]
        if isinstance(item, bool) and kind != "boolean":
            return False
        if not isinstance(item, JSON_TYPES[kind]):
            return False
    return True


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


def retrieval_scores(qrels: dict[str, dict[str, int]], runs: dict[str, dict[str, dict[str, float]]], k: int) -> dict:
    """ranx MRR, Recall@k and NDCG@k of each named run; with two runs, ranx's Fisher randomization test between them."""
    from ranx import Qrels, Run, compare, evaluate

    metrics = ["mrr", f"recall@{k}", f"ndcg@{k}"]
    qrels_ = Qrels(qrels)
    ranx_runs = {name: Run(run, name=name) for name, run in runs.items()}
    scores = {name: {m: float(v) for m, v in evaluate(qrels_, run, metrics).items()} for name, run in ranx_runs.items()}
    result = {"metrics": scores, "queries": len(qrels)}
    if len(ranx_runs) == 2:
        report = compare(qrels_, list(ranx_runs.values()), metrics=metrics, stat_test="fisher", max_p=0.05, random_seed=42)
        first, second = list(ranx_runs)
        pair = report.comparisons[(first, second)]
        result["fisher_p"] = {m: float(pair[m]["p_value"]) for m in metrics}
    return result
