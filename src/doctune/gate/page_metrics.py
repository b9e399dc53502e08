"""Scores of the page-extraction gate: a reply parsed as strict JSON (never repaired), field accuracy against the
page's reference (exact and normalised), schema conformance, the per-model summary, the paired comparison of two
models on the same pages, and the rules the decision rests on. Pure functions: no model, no tracking.

A page record (`score_page`) is what the gate keeps per page and model:

    {"id": str, "reply": str, "first_reply": str | None, "retried": bool, "first_try_valid": bool, "valid_json": bool,
     "error": str | None, "conforms": bool, "violations": [str, ...up to 3, each cut to 300 characters], "exact": float,
     "normalized": float,
     "keys": {key: {"exact": 0|1, "normalized": 0|1}}, "seconds": float, "reference": dict}
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from decimal import Decimal

import numpy as np

from doctune.config.pages import PageGateConfig
from doctune.gate.metrics import interval, paired_difference, paired_randomization_p
from doctune.page_schema import keys_of, parse_reply, violations

MAX_VIOLATIONS = 3  # per page record; the first ones name the keys well enough
MAX_VIOLATION_CHARS = 300  # a violation quotes the value: a 100 kB reply would be quoted whole

# -- field accuracy --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+(\.\d+)?|\.\d+)")  # as text: plain decimals only ("1e3" stays text; ".5" is not 5)


def _canonical_number(text: str) -> str:
    """A whole number without its zero fraction or leading zeros: 12, 12.0, "12", "12.00", "012" -> "12". Other
    decimals keep their digits ("3.10" is not "3.1": section numbers), a JSON number in its shortest form (0.5)."""
    number = Decimal(text)
    if number == number.to_integral_value():
        return str(int(number))
    return text.lstrip("+")


def _strip_punctuation(text: str) -> str:
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def _normalize_text(text: str) -> str:
    collapsed = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    if _NUMBER.fullmatch(collapsed):  # before stripping punctuation: "-12" keeps its sign
        return _canonical_number(collapsed)
    core = _strip_punctuation(collapsed)
    return _canonical_number(core) if _NUMBER.fullmatch(core) else core


def _tree(value):
    """The value with every leaf normalised; lists and objects kept as structure."""
    if isinstance(value, list | tuple):
        return [_tree(v) for v in value]
    if isinstance(value, dict):
        return {_normalize_text(str(k)): _tree(v) for k, v in value.items()}
    return _scalar(value)


def _scalar(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return str(int(value)) if value == int(value) else repr(value)
    return _normalize_text(str(value))


def normalize_value(value) -> str:
    """A value as the normalised match compares it: text in Unicode NFKC, case-folded, whitespace collapsed, leading and
    trailing punctuation and whitespace stripped (accents kept: "Résumé" is not "Resume"); whole numbers as canonical
    text (12, "12" and "12.0" are equal; "3.10" and "3.1" are not); None, "" and an empty list or object equal; lists
    compared element by element (nested lists: table rows), objects key by key."""
    tree = _tree(value)
    if isinstance(tree, str):
        return tree
    if not tree:  # [] or {}: nothing, like null
        return ""
    return json.dumps(tree, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _same_json(a, b) -> bool:
    """JSON equality: booleans are not numbers, numbers compare by value (12 == 12.0), arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def field_scores(prediction: dict | None, reference: dict, schema: dict) -> dict:
    """Per field of the schema (the reference's keys where the schema names none): exact (the JSON values equal) and
    normalised (`normalize_value` equal), 0 or 1. A key the reference has (null included) scores 0 when the prediction
    leaves it out; a key both leave out (an optional key of the user's schema the page has no value for) scores 1. A
    reference without a key the prediction gives compares as null. An invalid reply (None) scores 0 on every key. With
    no keys at all, any object scores 1. Returns {"exact": mean, "normalized": mean, "keys": {key: {"exact",
    "normalized"}}}."""
    keys = keys_of(schema) or list(reference)
    per_key = {}
    for key in keys:
        if prediction is None or (key not in prediction and key in reference):
            per_key[key] = {"exact": 0, "normalized": 0}
            continue
        predicted, expected = prediction.get(key), reference.get(key)
        per_key[key] = {
            "exact": int(_same_json(predicted, expected)),
            "normalized": int(normalize_value(predicted) == normalize_value(expected)),
        }
    if not keys:
        whole = float(prediction is not None)
        return {"exact": whole, "normalized": whole, "keys": {}}
    return {
        "exact": sum(k["exact"] for k in per_key.values()) / len(keys),
        "normalized": sum(k["normalized"] for k in per_key.values()) / len(keys),
        "keys": per_key,
    }


def score_page(
    reply: str, reference: dict, schema: dict, seconds: float, retried_reply: str | None = None, *, page_id: str = ""
) -> dict:
    """The record of one page (see the module docstring). `reply`: the model's first reply; `retried_reply`: its reply
    when asked once more because the first was not valid JSON (consulted only then). The page counts as valid JSON
    when the final reply is; `first_try_valid` says whether it was without the retry. Fields and conformance are
    scored on the final reply. `seconds`: the page's wall time, both attempts included."""
    first, first_error = parse_reply(reply)
    retried = first is None and retried_reply is not None
    final_reply = retried_reply if retried else reply
    parsed, error = parse_reply(final_reply) if retried else (first, first_error)
    problems = violations(parsed, schema) if parsed is not None else []
    scores = field_scores(parsed, reference, schema)
    return {
        "id": page_id,
        "reply": final_reply,
        "first_reply": reply if retried else None,
        "retried": retried,
        "first_try_valid": first is not None,
        "valid_json": parsed is not None,
        "error": error,
        "conforms": parsed is not None and not problems,
        "violations": [_cut(problem) for problem in problems[:MAX_VIOLATIONS]],
        "exact": scores["exact"],
        "normalized": scores["normalized"],
        "keys": scores["keys"],
        "seconds": float(seconds),
        "reference": reference,
    }


def _cut(text: str, limit: int = MAX_VIOLATION_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- over pages --------------------------------------------------------------------------------------------------------

SUMMARY_RATES = {  # summary name -> page-record field
    "json_validity": "valid_json",
    "first_try_validity": "first_try_valid",
    "schema_conformance": "conforms",
    "field_accuracy_exact": "exact",
    "field_accuracy_normalized": "normalized",
}


def summarize(pages: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """One model over its pages: each rate of SUMMARY_RATES as `interval` gives it (mean, 95% bootstrap interval, n;
    no interval, NaN, from fewer than two pages), per-key accuracy ({key: {"exact", "normalized", "n"}}, keys in the
    order first seen), latency in ms (p50, p95, mean), the number of pages retried, and n."""
    out: dict = {name: _interval([float(p[field]) for p in pages], resamples, seed) for name, field in SUMMARY_RATES.items()}
    per_key: dict[str, dict] = {}
    for page in pages:
        for key, score in page["keys"].items():
            row = per_key.setdefault(key, {"exact": 0.0, "normalized": 0.0, "n": 0})
            row["exact"] += score["exact"]
            row["normalized"] += score["normalized"]
            row["n"] += 1
    out["per_key"] = {key: {"exact": r["exact"] / r["n"], "normalized": r["normalized"] / r["n"], "n": r["n"]}
                      for key, r in per_key.items()}  # fmt: skip
    ms = np.asarray([p["seconds"] * 1000 for p in pages], dtype=float)
    out["latency_ms"] = (
        {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean())}
        if ms.size
        else {"p50": math.nan, "p95": math.nan, "mean": math.nan}
    )
    out["retried"] = sum(bool(p["retried"]) for p in pages)
    out["n"] = len(pages)
    return out


def _interval(values: list[float], resamples: int, seed: int) -> dict:
    """`interval`, without the interval from fewer than two pages: resampling one page always draws that page, which
    is no interval at all."""
    result = interval(values, resamples, seed)
    if len(values) < 2:
        result |= {"ci_low": math.nan, "ci_high": math.nan}
    return result


def compare(candidate_pages: list[dict], reference_pages: list[dict], permutations: int, seed: int = 0) -> dict:
    """The candidate against a reference model on the same pages (matched by id): per-page normalised field accuracy.

    Returns {"metric": "field_accuracy_normalized", "n", "candidate_mean", "reference_mean", "difference" (mean
    candidate - reference with its 95% paired bootstrap interval, `paired_difference`; NaN from one page), "p",
    "p_worse", "min_p" (the smallest p a sign-flip test of n pages can give: 2^-n, or 1 with no page), "wins",
    "losses", "ties"}. `p` is the one-sided paired randomization p-value (sign flips of the per-page differences)
    of the candidate being better than the reference: small p, the candidate is significantly better (it is
    `paired_randomization_p` with the two models swapped, since that function tests for "worse"). `p_worse` is the
    opposite direction: small, the candidate is significantly worse. Identical scores give p = p_worse = 1.

    Raises ValueError naming the ids when the two models were scored on different pages (or an id repeats)."""
    cand, ref = _by_id(candidate_pages, "candidate"), _by_id(reference_pages, "reference")
    if cand.keys() != ref.keys():
        only_cand, only_ref = sorted(cand.keys() - ref.keys()), sorted(ref.keys() - cand.keys())
        raise ValueError(
            "the models were scored on different pages: "
            f"only the candidate has {_ids(only_cand)}; only the reference has {_ids(only_ref)}"
        )
    ids = list(cand)
    c = [float(cand[i]["normalized"]) for i in ids]
    r = [float(ref[i]["normalized"]) for i in ids]
    return {
        "metric": "field_accuracy_normalized",
        "n": len(ids),
        "candidate_mean": float(np.mean(c)) if ids else math.nan,
        "reference_mean": float(np.mean(r)) if ids else math.nan,
        "difference": paired_difference(c, r, seed=seed) | ({"ci_low": math.nan, "ci_high": math.nan} if len(ids) < 2 else {}),
        "p": paired_randomization_p(r, c, permutations, seed),
        "p_worse": paired_randomization_p(c, r, permutations, seed),
        "min_p": 0.5 ** len(ids),
        "wins": sum(x > y for x, y in zip(c, r)),
        "losses": sum(x < y for x, y in zip(c, r)),
        "ties": sum(x == y for x, y in zip(c, r)),
    }


def _by_id(pages: list[dict], side: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for page in pages:
        if page["id"] in out:
            raise ValueError(f"the {side} has page id {page['id']!r} more than once")
        out[page["id"]] = page
    return out


def _ids(ids: list[str], most: int = 10) -> str:
    if not ids:
        return "none"
    shown = ", ".join(repr(i) for i in ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


def decide(
    candidate_summary: dict, comparison: dict | None, config: PageGateConfig, reference_name: str
) -> tuple[list[dict], list[str]]:
    """The page gate's rules, each {"rule", "value", "threshold", "passed", "why"}, and the names of those failed:

    - json_validity: the candidate's share of pages with a valid JSON reply (after the one retry) >= min_json_validity.
    - beat_champion (only when config.beat_champion): the candidate's per-page normalised field accuracy is higher than
      the reference's (`reference_name`: "champion", or "base" before there is one) with the one-sided p of `compare`
      below config.significance; value is that p, threshold the significance. No comparison: failed.

    Latency is reported beside the goal, never a rule."""
    validity = candidate_summary["json_validity"]["mean"]
    rules = [
        {
            "rule": "json_validity",
            "value": validity,
            "threshold": config.min_json_validity,
            "passed": not math.isnan(validity) and validity >= config.min_json_validity - 1e-12,
            "why": f"share of {candidate_summary['n']} pages whose reply is valid JSON (one retry, no repair) "
            f">= {config.min_json_validity:g}",
        }
    ]
    if config.beat_champion:
        rules.append(_beat_rule(comparison, config, reference_name))
    return rules, [r["rule"] for r in rules if not r["passed"]]


def _beat_rule(comparison: dict | None, config: PageGateConfig, reference_name: str) -> dict:
    if not comparison or not comparison["n"]:
        return {"rule": "beat_champion", "value": math.nan, "threshold": config.significance, "passed": False,
                "why": f"no pages scored by both the candidate and the {reference_name}"}  # fmt: skip
    diff, p, n = comparison["difference"], comparison["p"], comparison["n"]
    passed = diff["mean"] > 0 and p < config.significance
    ci = "" if math.isnan(diff["ci_low"]) else f" [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
    why = (
        f"per-page field accuracy (normalised) {comparison['candidate_mean']:.3f} vs {reference_name} "
        f"{comparison['reference_mean']:.3f} on {n} pages, difference {diff['mean']:+.3f}{ci}; one-sided paired "
        f"randomization p (candidate better) = {p:.4f} {'<' if p < config.significance else '>='} {config.significance:g}"
    )
    floor = comparison.get("min_p", 0.5**n)
    if floor >= config.significance:
        why += (
            f"; with {n} test page(s) no p below 2^-{n} = {floor:.3g} is possible, so this rule cannot pass: more test "
            "pages are needed (more documents, or a larger test share)"
        )
    return {"rule": "beat_champion", "value": p, "threshold": config.significance, "passed": passed, "why": why}
