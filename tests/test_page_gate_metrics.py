"""The page gate's scores as a user sees them: strict JSON (a fenced or chatty reply is invalid, never repaired),
exact vs normalised field match, the retry, the rules (JSON validity bar, beating the champion) and the report;
fast, no model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from doctune.config.pages import PageGateConfig
from doctune.gate.page_metrics import compare, decide, field_scores, normalize_value, parse_reply, score_page, summarize
from doctune.gate.page_report import HTML_FILE, MARKDOWN_FILE, pick_samples, write_report
from doctune.page_schema import SELF_SUPERVISED_SCHEMA as SCHEMA

REFERENCE = {"title": "Installing the agent", "section": "3.2", "running_header": "Admin Guide", "page_number": "12",
             "first_paragraph": "The agent runs on every node.", "table_rows": [["Port", "Use"], ["8080", "HTTP"]]}  # fmt: skip
GOOD = json.dumps(REFERENCE)


def page(reply: str, page_id: str, retried_reply: str | None = None, reference: dict = REFERENCE, seconds=0.5) -> dict:
    return score_page(reply, reference, SCHEMA, seconds, retried_reply, page_id=page_id)


# -- strict JSON -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (f"```json\n{GOOD}\n```", "code fence"),
        (f"Here is the JSON: {GOOD}", "prose around the JSON"),
        (f"{GOOD}\nHope this helps!", "prose around the JSON"),
        ('{"title": "a",}', "not JSON"),
        ("{'title': 'a'}", "not JSON"),
        ('{"title" "a"}', "not JSON: Expecting ':' delimiter at char 9"),
        (f"[{GOOD}]", "a JSON array, not an object"),
        ('"just text"', "a JSON string, not an object"),
        ("42", "a JSON number, not an object"),
        ('{"page_number": NaN}', "not JSON"),
        ('{"title": "a", "title": "b"}', "duplicate key 'title'"),
        ("   ", "empty reply"),
    ],
)
def test_a_reply_that_is_not_exactly_one_json_object_is_invalid_and_not_repaired(reply, reason):
    parsed, why = parse_reply(reply)
    assert parsed is None and reason in why
    record = page(reply, "p1")
    assert not record["valid_json"] and not record["conforms"] and record["normalized"] == 0 and record["exact"] == 0
    assert record["reply"] == reply and reason in record["error"]  # kept as the model wrote it


def test_a_whole_json_object_is_valid_surrounding_whitespace_aside():
    assert parse_reply(f"\n  {GOOD}  \n") == (REFERENCE, None)
    record = page(GOOD, "p1")
    assert record["valid_json"] and record["first_try_valid"] and record["conforms"] and not record["retried"]
    assert record["exact"] == record["normalized"] == 1.0 and record["violations"] == []


def test_a_valid_object_that_breaks_the_schema_is_valid_json_but_does_not_conform():
    record = page(json.dumps(REFERENCE | {"page_number": 12, "extra": "x"}), "p1")
    assert record["valid_json"] and not record["conforms"]
    assert len(record["violations"]) == 2 and any("page_number" in v for v in record["violations"])


# -- field match -------------------------------------------------------------------------------------------------------


def test_normalised_match_forgives_case_width_and_spacing_but_not_accents():
    assert normalize_value("Ｓｅｃｔｉｏｎ　３") == normalize_value("section 3") == normalize_value("  SECTION\n 3. ")
    assert normalize_value("Résumé") != normalize_value("Resume")
    assert normalize_value(12) == normalize_value("12") == normalize_value("12.0") == normalize_value(12.0)
    assert normalize_value("-12") != normalize_value("12") and normalize_value("3.10") != normalize_value("3.1")
    assert normalize_value(None) == normalize_value("") == normalize_value([])
    assert normalize_value([["Port ", "use"]]) == normalize_value([["port", "USE"]])
    assert normalize_value([["a", "b"]]) != normalize_value([["a"], ["b"]])  # rows keep their shape
    assert normalize_value(["a b"]) != normalize_value(["a", "b"])


def test_exact_match_does_not_forgive_what_normalised_match_does():
    prediction = REFERENCE | {"title": "INSTALLING THE AGENT", "section": "３.２"}  # full-width digits
    scores = field_scores(prediction, REFERENCE, SCHEMA)
    assert scores["keys"]["title"] == {"exact": 0, "normalized": 1}
    assert scores["keys"]["section"] == {"exact": 0, "normalized": 1}
    assert scores["keys"]["page_number"] == {"exact": 1, "normalized": 1}
    assert scores["exact"] == pytest.approx(4 / 6) and scores["normalized"] == 1.0
    resume = field_scores({"title": "Resume"}, {"title": "Résumé"}, {"properties": {"title": {}}})
    assert resume["normalized"] == 0


def test_a_missing_key_scores_zero_on_that_key_only():
    prediction = {k: v for k, v in REFERENCE.items() if k != "running_header"}
    scores = field_scores(prediction, REFERENCE, SCHEMA)
    assert scores["keys"]["running_header"] == {"exact": 0, "normalized": 0}
    assert all(s == {"exact": 1, "normalized": 1} for k, s in scores["keys"].items() if k != "running_header")
    assert scores["exact"] == scores["normalized"] == pytest.approx(5 / 6)
    assert field_scores(None, REFERENCE, SCHEMA)["normalized"] == 0  # invalid reply: every key 0


def test_keys_come_from_the_reference_when_the_schema_names_none():
    scores = field_scores({"a": "X", "b": 2}, {"a": "x", "b": 2, "c": None}, {"type": "object"})
    assert list(scores["keys"]) == ["a", "b", "c"] and scores["normalized"] == pytest.approx(2 / 3)


# -- retry and summary -------------------------------------------------------------------------------------------------


def test_a_retry_that_fixes_the_json_counts_as_valid_but_lowers_first_try_validity():
    pages = [page(GOOD, f"p{i}") for i in range(8)]
    pages.append(page(f"```json\n{GOOD}\n```", "fixed", retried_reply=GOOD))
    pages.append(page("{oops", "still-bad", retried_reply="Sure! {oops}"))
    fixed, bad = pages[-2], pages[-1]
    assert fixed["valid_json"] and fixed["retried"] and not fixed["first_try_valid"] and fixed["normalized"] == 1.0
    assert fixed["first_reply"].startswith("```") and fixed["reply"] == GOOD
    assert not bad["valid_json"] and bad["retried"]
    assert page(GOOD, "x", retried_reply="{}")["retried"] is False  # a valid first reply is never asked again

    summary = summarize(pages)
    assert summary["json_validity"]["mean"] == pytest.approx(0.9)
    assert summary["first_try_validity"]["mean"] == pytest.approx(0.8)
    assert summary["schema_conformance"]["mean"] == pytest.approx(0.9)
    assert summary["field_accuracy_normalized"]["mean"] == pytest.approx(0.9)
    ci = summary["field_accuracy_exact"]
    assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"] and ci["n"] == 10
    assert summary["per_key"]["title"] == {"exact": 0.9, "normalized": 0.9, "n": 10}
    assert summary["latency_ms"]["p50"] == pytest.approx(500) and summary["retried"] == 2 and summary["n"] == 10


# -- comparison and rules ----------------------------------------------------------------------------------------------


def models_on(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(candidate, champion) on `n` pages: the candidate gets about 5 of 6 fields, the champion about 2."""
    rng = np.random.default_rng(seed)
    keys = list(REFERENCE)

    def reply(right: int) -> str:
        wrong = set(rng.choice(len(keys), size=len(keys) - right, replace=False).tolist())
        return json.dumps({k: ("wrong" if i in wrong and k != "table_rows" else [] if i in wrong else REFERENCE[k])
                           for i, k in enumerate(keys)})  # fmt: skip

    candidate = [page(reply(int(rng.integers(4, 7))), f"p{i}") for i in range(n)]
    champion = [page(reply(int(rng.integers(0, 4))), f"p{i}") for i in range(n)]
    return candidate, champion


def test_a_clearly_better_candidate_beats_the_champion_and_an_identical_one_does_not():
    config = PageGateConfig()
    candidate, champion = models_on(30)
    comparison = compare(candidate, list(reversed(champion)), permutations=2000)  # matched by id, not position
    assert comparison["n"] == 30 and comparison["p"] < 0.05 and comparison["difference"]["mean"] > 0.3
    assert comparison["p_worse"] > 0.5 and comparison["wins"] == 30
    rules, failed = decide(summarize(candidate), comparison, config, "champion")
    assert failed == [] and {r["rule"] for r in rules} == {"json_validity", "beat_champion"}
    beat = next(r for r in rules if r["rule"] == "beat_champion")
    assert beat["passed"] and beat["value"] < 0.05 and beat["threshold"] == 0.05 and "champion" in beat["why"]

    same = compare(candidate, candidate, permutations=2000)
    assert same["p"] == 1.0 and same["difference"]["mean"] == 0
    rules, failed = decide(summarize(candidate), same, config, "base")
    assert failed == ["beat_champion"] and "base" in rules[1]["why"]

    worse = compare(champion, candidate, permutations=2000)
    assert decide(summarize(champion), worse, config, "champion")[1] == ["beat_champion"]
    assert decide(summarize(champion), worse, PageGateConfig(beat_champion=False), "champion")[1] == []


def test_json_validity_below_the_bar_fails_the_rule():
    pages = [page(GOOD, f"p{i}") for i in range(98)] + [page("nope", "bad1"), page("{", "bad2")]
    rules, failed = decide(summarize(pages), None, PageGateConfig(min_json_validity=0.99, beat_champion=False), "base")
    assert failed == ["json_validity"] and rules[0]["value"] == pytest.approx(0.98) and rules[0]["threshold"] == 0.99
    pages[-1] = page(GOOD, "bad2")
    assert decide(summarize(pages), None, PageGateConfig(beat_champion=False), "base")[1] == []  # 0.99 meets 0.99


def test_pages_scored_on_different_ids_raise_naming_them():
    candidate, champion = models_on(5)
    champion[2] = champion[2] | {"id": "p-extra"}
    with pytest.raises(ValueError, match=r"only the candidate has 'p2'.*only the reference has 'p-extra'"):
        compare(candidate, champion, permutations=100)
    with pytest.raises(ValueError, match="'p0' more than once"):
        compare(candidate, [*candidate, candidate[0]], permutations=100)


# -- report ------------------------------------------------------------------------------------------------------------


def test_the_report_shows_the_decision_and_escapes_the_model_output(tmp_path):
    config = PageGateConfig()
    candidate, champion = models_on(30)
    hostile = '{"title": "<script>alert(1)</script>"} ``` | not | a | table'
    candidate[0] = page(hostile, "p0", retried_reply=json.dumps(REFERENCE | {"title": "<script>x</script>"}))
    comparison = compare(candidate, champion, permutations=1000)
    summaries = {"candidate": summarize(candidate), "champion": summarize(champion), "base": summarize(champion)}
    rules, failed = decide(summaries["candidate"], comparison, config, "champion")
    samples = [candidate[0], *pick_samples(candidate[1:], k=4)]
    result = {"decision": "promote" if not failed else "reject", "version": 7,
              "models": {"candidate": "doctune-pages-v7", "champion": "doctune-pages-v6", "base": "Qwen/Qwen3-VL-8B"},
              "reference": "champion", "summaries": summaries, "latency_goal_ms": config.latency_goal_ms,
              "rules": rules, "failed": failed, "comparison": comparison, "samples": samples}  # fmt: skip
    write_report(tmp_path / "out", result)

    text = (tmp_path / "out" / MARKDOWN_FILE).read_text()
    page_html = (tmp_path / "out" / HTML_FILE).read_text()
    assert "Page gate: PROMOTE (candidate version 7)" in text and "PROMOTE" in page_html
    assert "doctune-pages-v6" in text and "beat_champion" in page_html and "latency p95 (ms), goal 1000" in text
    assert "<script>" not in page_html and "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html
    assert "&lt;script&gt;x&lt;/script&gt;" in page_html  # the retried reply
    assert "<link" not in page_html and "src=" not in page_html  # self-contained
    assert "````" in text  # a fence longer than the reply's own backticks
    assert text.count("### page ") == 5 and "running_header" in text

    result |= {"decision": "reject", "failed": ["json_validity"], "samples": [], "comparison": None,
               "summaries": {"candidate": summaries["candidate"], "base": summaries["base"]}, "reference": "base",
               "models": {"candidate": "c", "champion": None, "base": "b"}}  # fmt: skip
    write_report(tmp_path / "out", result)
    text = (tmp_path / "out" / MARKDOWN_FILE).read_text()
    assert "Page gate: REJECT" in text and "Failed rules: json_validity" in text and "Not compared" in text


# -- odd replies, small test sets ----------------------------------------------------------------------------------------


def test_a_degenerate_deeply_nested_reply_is_invalid_not_a_crash():
    for reply in (
        "[" * 5000 + "]" * 5000,
        '{"title": ' + "[" * 900 + "]" * 900 + "}",
        "Sure: " + '{"a":' * 3000 + "1" + "}" * 3000,
    ):
        record = page(reply, "deep")
        assert not record["valid_json"] and record["normalized"] == 0 and record["reply"] == reply
        assert "nested deeper than" in record["error"] or "prose" in record["error"]


@pytest.mark.parametrize("around", ["\ufeff{}", "{}\u2028", "{}\u00a0"])
def test_characters_that_are_not_json_whitespace_around_the_object_are_named(around):
    reply = around.replace("{}", GOOD)
    parsed, why = parse_reply(reply)
    assert parsed is None and "not JSON whitespace" in why and "U+" in why
    assert parse_reply(GOOD + "\r\n")[0] == REFERENCE  # a trailing newline is JSON whitespace


def test_an_optional_key_both_leave_out_is_a_match_and_a_leading_dot_number_is_not_a_whole_one():
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "note": {"type": "string"}}}
    scores = field_scores({"total": 12}, {"total": 12}, schema)
    assert scores["keys"]["note"] == {"exact": 1, "normalized": 1} and scores["normalized"] == 1.0
    assert field_scores({}, {"total": 12}, schema)["keys"]["total"] == {"exact": 0, "normalized": 0}
    assert normalize_value(".5") != normalize_value("5")


def test_a_one_page_test_set_has_no_interval_and_says_the_rule_cannot_pass(tmp_path):
    candidate, base = [page(GOOD, "p1")], [page("{}", "p1")]
    summary = summarize(candidate)
    assert summary["field_accuracy_normalized"]["mean"] == 1.0 and np.isnan(summary["field_accuracy_normalized"]["ci_low"])
    comparison = compare(candidate, base, permutations=500)
    assert np.isnan(comparison["difference"]["ci_low"]) and comparison["min_p"] == 0.5
    rules, failed = decide(summary, comparison, PageGateConfig(), "base")
    assert failed == ["beat_champion"] and "cannot pass: more test pages are needed" in rules[1]["why"]
    result = {"decision": "reject", "version": 1, "models": {"candidate": "c", "champion": None, "base": "b"},
              "reference": "base", "summaries": {"candidate": summary, "base": summarize(base)}, "latency_goal_ms": 1000,
              "rules": rules, "failed": failed, "comparison": comparison, "samples": candidate}  # fmt: skip
    write_report(tmp_path, result)
    text = (tmp_path / MARKDOWN_FILE).read_text()
    assert "1.000 (no interval from 1 page)" in text and "+1.000 (no interval from one page)" in text and "nan" not in text


def test_a_violation_quoting_a_huge_value_is_cut():
    record = page(json.dumps(REFERENCE | {"title": ["x" * 100_000]}), "long")
    assert record["valid_json"] and not record["conforms"] and all(len(v) <= 300 for v in record["violations"])
