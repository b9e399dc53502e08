"""The statistics the gate's verdict rests on (bootstrap intervals, the smallest difference a set detects), the rules
built on them, stratified eval sets and how the report shows it all; fast, no model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_gate import citing

from doctune.config import GateRules
from doctune.gate.evaluate import eval_items, stratified
from doctune.gate.metrics import (
    bootstrap_ci,
    group_scores,
    metric_intervals,
    min_detectable_difference,
    paired_difference,
    paired_sd,
)
from doctune.gate.report import markdown
from doctune.gate.rules import INSUFFICIENT, PROMOTE, REJECT, decide

Z_95, Z_80 = 1.6448536269514722, 0.8416212335729143  # one-sided alpha 0.05, power 0.8


def model(f1, abstained, **metrics) -> dict:
    """Scores of one model as evaluate_model returns them, from its per-item lists."""
    defaults = {"golden_f1": float(np.mean(f1)), "abstention_accuracy": float(np.mean(abstained)),
                "false_abstention_rate": 0.05, "format_compliance": 1.0, "capability_accuracy": 0.6, "citation_precision": 0.9,
                "general_perplexity": 20.0, "domain_perplexity": 10.0}  # fmt: skip
    per_example = {
        "golden_f1": list(f1),
        "abstained": list(abstained),
        **citing((defaults | metrics)["citation_precision"], len(f1)),
    }
    defaults["citation_recall"] = float(np.mean(per_example["source_cited"]))
    return {"metrics": defaults | metrics, "per_example": per_example}


def clearly_better(n: int, seed: int = 0) -> tuple[dict, dict]:
    """(candidate, base) on `n` items: F1 about 0.6 against 0.3, both noisy; the candidate abstains more often."""
    rng = np.random.default_rng(seed)
    base_f1 = np.clip(rng.normal(0.3, 0.2, n), 0, 1)
    cand_f1 = np.clip(base_f1 + rng.normal(0.3, 0.2, n), 0, 1)
    base_abstained = (rng.random(n) < 0.7).astype(float)
    cand_abstained = np.maximum(base_abstained, rng.random(n) < 0.5)
    return model(cand_f1, cand_abstained), model(base_f1, base_abstained)


def rule(verdict: dict, name: str) -> dict:
    (found,) = [r for r in verdict["rules"] if r["name"] == name]
    return found


# -- intervals and power ---------------------------------------------------------------------------------------


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (20, 500):
        values = rng.random(n)
        low, high = bootstrap_ci(values)
        assert low < values.mean() < high
        widths[n] = high - low
    # The width falls like 1/sqrt(n): 25x the items, about a fifth of the width.
    assert 0.12 < widths[500] / widths[20] < 0.3
    assert bootstrap_ci(values) == bootstrap_ci(values)  # fixed seed: the same report twice


def test_interval_of_a_constant_list_is_a_point():
    low, high = bootstrap_ci([0.4] * 50)
    assert low == high == pytest.approx(0.4)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_every_per_item_metric_gets_its_interval_and_item_count():
    per_example = {"golden_f1": [0.2, 0.8, 0.5], "abstained": [1.0, 0.0], "closed_book_f1": [], "format": [1.0] * 15}
    intervals = metric_intervals(per_example)
    assert set(intervals) == {"golden_f1", "abstention_accuracy", "format_compliance"}  # no closed-book items: none
    assert intervals["golden_f1"]["n"] == 3 and intervals["golden_f1"]["mean"] == pytest.approx(0.5)
    assert intervals["format_compliance"]["ci_low"] == intervals["format_compliance"]["ci_high"] == 1.0


def test_paired_difference_interval_excludes_zero_for_a_clear_gain():
    cand, base = clearly_better(200)
    diff = paired_difference(cand["per_example"]["golden_f1"], base["per_example"]["golden_f1"])
    assert 0 < diff["ci_low"] < diff["mean"] < diff["ci_high"] and diff["n"] == 200
    with pytest.raises(ValueError, match="same items"):
        paired_difference([0.1, 0.2], [0.1])


def test_detectable_difference_follows_the_formula_and_shrinks_with_root_n():
    assert min_detectable_difference(0.3, 100, 0.05) == pytest.approx((Z_95 + Z_80) * 0.3 / 10)
    assert min_detectable_difference(0.3, 400, 0.05) == pytest.approx(min_detectable_difference(0.3, 100, 0.05) / 2)
    assert min_detectable_difference(0.3, 100, 0.01) > min_detectable_difference(0.3, 100, 0.05)  # stricter alpha
    assert min_detectable_difference(0.3, 1, 0.05) == math.inf


def test_spread_of_the_differences_falls_back_when_they_do_not_vary():
    assert paired_sd([0.5, 0.9, 0.1], [0.4, 0.6, 0.5]) == pytest.approx(np.std([0.1, 0.3, -0.4], ddof=1))
    # A constant shift: the spread of two independent samples, not zero.
    assert paired_sd([0.5, 0.9], [0.4, 0.8]) == pytest.approx(math.sqrt(np.var([0.5, 0.9], ddof=1) + np.var([0.4, 0.8], ddof=1)))
    assert paired_sd([1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0], binary=True) == pytest.approx(math.sqrt(2 * 0.75 * 0.25))
    assert paired_sd([0.3] * 5, [0.3] * 5) == 0.5  # nothing varies: the worst case, not a powerful set
    assert paired_sd([0.0] * 8, [0.0] * 8, binary=True) == 0.5


# -- the decision --------------------------------------------------------------------------------------------


def test_a_small_noisy_set_is_insufficient_evidence_naming_what_it_can_detect():
    rules = GateRules()
    cand_f1 = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.9, 0.6, 0.5, 0.4, 0.8, 0.7]
    base_f1 = [0.3, 0.2, 0.4, 0.1, 0.3, 0.5, 0.2, 0.3, 0.4, 0.2, 0.3, 0.2]
    abstained = [1.0] * 10 + [0.0] * 2
    base = model(base_f1, abstained)
    verdict = decide({"candidate": model(cand_f1, abstained), "champion": base, "base": base}, {}, rules)
    assert verdict["decision"] == INSUFFICIENT
    assert verdict["failed"][0] == "insufficient_evidence"
    expected = (Z_95 + Z_80) * np.std(np.subtract(cand_f1, base_f1), ddof=1) / math.sqrt(12)
    power = rule(verdict, "evidence:golden_f1")
    assert not power["passed"] and power["value"] == pytest.approx(expected) and power["threshold"] == 0.05
    assert power["detail"].startswith(f"12 golden items detect an F1 difference of {expected:.3f} at alpha 0.05 and 80% power")
    assert "the gate needs 0.05: give the corpus more text or raise synth.min_golden" in power["detail"]
    assert power["detail"] in verdict["reason"]


def test_a_large_clearly_better_set_is_promoted():
    cand, base = clearly_better(400)
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())
    assert verdict["decision"] == PROMOTE, verdict["failed"]
    assert verdict["evidence"]["golden_f1"]["detectable"] <= 0.05 and verdict["evidence"]["abstention"]["sufficient"]
    gain = verdict["f1_differences"]["candidate - base"]
    assert gain["ci_low"] > 0.2 and gain["n"] == 400


def test_insufficient_evidence_also_lists_the_rules_that_failed():
    cand, base = clearly_better(12)
    cand["metrics"]["general_perplexity"] = 40.0
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())
    assert verdict["decision"] == INSUFFICIENT
    assert verdict["failed"][0] == "insufficient_evidence" and "general_perplexity_vs_base" in verdict["failed"]


def test_too_few_unanswerable_items_are_insufficient_evidence_for_abstention():
    cand, base = clearly_better(400)
    for scores in (cand, base):
        scores["per_example"]["abstained"] = scores["per_example"]["abstained"][:10]
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())
    assert verdict["decision"] == INSUFFICIENT
    assert rule(verdict, "evidence:golden_f1")["passed"]
    assert rule(verdict, "evidence:abstention")["detail"].startswith("10 unanswerable items detect an abstention difference")


def with_citations(scores: dict, made: int, supported: int, n: int = 400) -> dict:
    """`scores` of a model that cited `made` of `n` golden answers, `supported` of them right."""
    cited = {
        "citations_made": [1.0] * made + [0.0] * (n - made),
        "citations_supported": [1.0] * supported + [0.0] * (n - supported),
    }
    scores["per_example"] |= cited | {"source_cited": cited["citations_supported"]}
    scores["metrics"]["citation_precision"] = supported / made if made else 0.0
    return scores


def test_a_candidate_that_cites_a_handful_of_passages_cannot_show_its_precision():
    cand, base = clearly_better(400)
    champion = model(base["per_example"]["golden_f1"], base["per_example"]["abstained"], citation_precision=0.8)
    verdict = decide({"candidate": with_citations(cand, 10, 6), "champion": champion, "base": base}, {}, GateRules())
    assert verdict["decision"] == INSUFFICIENT
    power = rule(verdict, "evidence:citation_precision")
    # The floor is 0.9 x 0.8 = 0.72; the larger binomial spread of 0.72 and 0.72 - 0.2 is that of 0.52.
    expected = (Z_95 + Z_80) * math.sqrt(0.52 * 0.48 / 10)
    assert not power["passed"] and power["value"] == pytest.approx(expected) and power["threshold"] == 0.2
    assert power["detail"].startswith(
        f"10 candidate citations detect a citation precision shortfall below the champion's floor of {expected:.3f}"
    )
    assert "the candidate cites too few passages to show its precision" in power["detail"]
    # Two citations, both right, are no more evidence: the spread is the floor's, not the observed one's (0).
    perfect = decide({"candidate": with_citations(cand, 2, 2), "champion": champion, "base": base}, {}, GateRules())
    assert not rule(perfect, "evidence:citation_precision")["passed"]
    # Enough citations, as many right as the champion's: promoted.
    fine = decide({"candidate": with_citations(cand, 400, 330), "champion": champion, "base": base}, {}, GateRules())
    assert fine["decision"] == PROMOTE, fine["failed"]
    # A candidate that stopped citing fails the rule itself: rejected, not sent for more data.
    silent = decide({"candidate": with_citations(cand, 0, 0), "champion": champion, "base": base}, {}, GateRules())
    assert silent["decision"] == REJECT and "citation_precision_vs_champion" in silent["failed"]
    assert "not checked (the rule already found" in rule(silent, "evidence:citation_precision")["detail"]
    # Before any citing champion the floor is 0: nothing to detect.
    first = decide(
        {
            "candidate": with_citations(cand, 10, 6),
            "champion": base
            | {
                "metrics": base["metrics"] | {"citation_precision": 0.0},
                "per_example": base["per_example"] | {"citations_made": [0.0] * 400, "citations_supported": [0.0] * 400},
            },
            "base": base,
        },
        {},
        GateRules(),
    )
    unchecked = rule(first, "evidence:citation_precision")
    assert unchecked["passed"] and "not checked (the champion's floor is 0" in unchecked["detail"]
    assert unchecked["value"] == pytest.approx((Z_95 + Z_80) * 0.5 / math.sqrt(10))  # what ten citations could show


def test_a_single_item_is_never_evidence_unless_the_check_is_off():
    cand, base = model([0.8], [1.0]), model([0.3], [1.0])
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules(min_detectable_f1=0.9))
    assert verdict["decision"] == INSUFFICIENT
    assert rule(verdict, "evidence:golden_f1")["detail"].startswith("1 golden item cannot estimate an F1 difference")
    # A margin of 1 or more asks for no power (no F1 difference exceeds 1): what a profile of a handful of items sets.
    off = GateRules(min_detectable_f1=1.0, min_detectable_abstention=1.0, min_detectable_citation_precision=1.0)
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, off.model_copy(update={"beat_base": False}))
    assert verdict["decision"] == PROMOTE and "not checked" in rule(verdict, "evidence:golden_f1")["detail"]
    cand, base = clearly_better(12)  # significantly better on 12 items, though they cannot detect 0.05
    assert decide({"candidate": cand, "champion": base, "base": base}, {}, off)["decision"] == PROMOTE


def test_domain_perplexity_above_the_base_rejects():
    cand, base = clearly_better(400)
    cand["metrics"]["domain_perplexity"] = 1.1 * base["metrics"]["domain_perplexity"]
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())
    assert verdict["decision"] == REJECT and verdict["failed"] == ["domain_perplexity_vs_base"]
    cand["metrics"]["domain_perplexity"] = 0.9 * base["metrics"]["domain_perplexity"]
    assert decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())["decision"] == PROMOTE


def test_abstention_targets_hold_the_candidate():
    cand, base = clearly_better(400)
    cand["metrics"]["abstention_accuracy"] = 0.55  # declines too few unanswerable questions
    base["metrics"]["abstention_accuracy"] = 0.5  # though more than the champion (the base) does
    assert decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())["failed"] == ["abstention_accuracy"]
    cand, base = clearly_better(400)
    cand["metrics"]["false_abstention_rate"] = 0.2  # declines answerable questions
    assert decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())["failed"] == ["false_abstention"]


# -- eval sets ------------------------------------------------------------------------------------------------


def write_records(path, groups: dict[tuple[str, str], int]) -> None:
    lines = []
    for (doc, qtype), count in groups.items():
        for i in range(count):
            meta = {"qtype": qtype, "doc_id": doc, "lang": "en", "context_chunk_ids": ["c1"]}
            lines.append(json.dumps({"question": f"{doc} {qtype} {i}?", "answer": "a", "chunk_ids": ["c1"], "meta": meta}))
    path.write_text("\n".join(lines) + "\n")


def test_stratified_selection_gives_every_document_and_question_type_a_fair_share(tmp_path):
    path = tmp_path / "golden.jsonl"
    # One manual with many definition questions would fill a set taken in record order.
    write_records(path, {("manual-a", "definition"): 40, ("manual-a", "procedure"): 5, ("manual-b", "definition"): 5,
                         ("manual-c", "numeric"): 2})  # fmt: skip
    items = eval_items(path, {"c1": {"chunk_id": "c1", "text": "text"}}, 12, [])
    assert len(items) == 12
    counts = {}
    for item in items:
        counts[(item["doc_id"], item["qtype"])] = counts.get((item["doc_id"], item["qtype"]), 0) + 1
    assert counts == {("manual-a", "definition"): 4, ("manual-a", "procedure"): 3, ("manual-b", "definition"): 3,
                      ("manual-c", "numeric"): 2}  # fmt: skip
    # Round-robin: any prefix is mixed too (the closed-book questions are the first ones).
    assert {(i["doc_id"], i["qtype"]) for i in items[:4]} == set(counts)
    # Record order within a group, and the same selection every time.
    assert [i["question"] for i in items if i["qtype"] == "procedure"] == [f"manual-a procedure {i}?" for i in range(3)]
    assert eval_items(path, {"c1": {"chunk_id": "c1", "text": "text"}}, 12, []) == items


def test_labels_default_to_unknown_and_a_small_set_is_kept_whole(tmp_path):
    path = tmp_path / "golden.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a", "chunk_ids": ["c1"], "meta": {"qtype": "llm"}}) + "\n")
    (item,) = eval_items(path, {"c1": {"chunk_id": "c1", "text": "text"}}, 5, [])
    assert (item["qtype"], item["doc_id"], item["lang"]) == ("llm", "unknown", "unknown")
    assert stratified([{"qtype": "x", "doc_id": "d"}] * 3, 10) == [{"qtype": "x", "doc_id": "d"}] * 3


def test_group_scores_per_question_type():
    groups = group_scores([1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.0], ["definition", "numeric", "definition", "numeric"])
    assert list(groups) == ["definition", "numeric"]
    assert groups["definition"]["n"] == 2 and groups["definition"]["candidate"] == pytest.approx(0.75)
    assert groups["numeric"]["reference"] == pytest.approx(0.0)
    assert groups["definition"]["ci_low"] <= 0.75 <= groups["definition"]["ci_high"]


# -- the report -----------------------------------------------------------------------------------------------


def test_report_shows_the_verdict_its_reason_and_every_metric_with_its_interval():
    cand, base = clearly_better(12)
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())
    for scores in (cand, base):
        scores["per_example"]["closed_book_f1"] = scores["per_example"]["golden_f1"][:6]
        scores["metrics"]["closed_book_f1"] = float(np.mean(scores["per_example"]["closed_book_f1"]))
    models = {name: {"metrics": s["metrics"], "intervals": metric_intervals(s["per_example"]), "per_example": s["per_example"]}
              for name, s in (("candidate", cand), ("base", base))}  # fmt: skip
    result = {**verdict, "version": "3", "champion_label": "none yet", "models": models, "samples": [],
              "citation_first_passage": 0.75,
              "retrieval": {"queries": 3, "metrics": {"base": {"mrr@10": 0.5}}, "p_values": {}, "source": "retriever stage",
                            "selected": "base"},
              "breakdowns": {"qtype": group_scores(cand["per_example"]["golden_f1"], base["per_example"]["golden_f1"],
                                                   ["definition", "numeric"] * 6)}}  # fmt: skip
    text = markdown(result)
    assert "# Gate: **INSUFFICIENT-EVIDENCE** (candidate version 3)" in text
    assert "12 golden items detect an F1 difference of" in text and "raise synth.min_golden" in text
    assert "from the retriever stage)" in text and "| base (selected) | 0.5000 |" in text
    f1 = models["candidate"]["intervals"]["golden_f1"]
    assert f"| golden F1 (RAG) | 12 | {cand['metrics']['golden_f1']:.3f} [{f1['ci_low']:.3f}, {f1['ci_high']:.3f}] |" in text
    assert "| golden F1 (closed book) | 6 |" in text
    assert "## Golden F1 (RAG) per question type" in text and "| definition | 6 |" in text
    recall = models["candidate"]["intervals"]["citation_recall"]
    assert f"| candidate | 12 | 12 | 11 | 0.900 | {recall['mean']:.3f} [{recall['ci_low']:.3f}, " in text  # 11 of 12 hold it
    assert "Citing passage [1] every time would score precision and recall 0.750" in text


def test_console_summary_gives_the_reason_the_detectable_differences_and_intervals():
    from doctune.summary import _gate_summary

    cand, base = clearly_better(12)
    verdict = decide({"candidate": cand, "champion": base, "base": base}, {}, GateRules())
    extra = {"golden_rouge_l": 0.4, "hallucination_rate": 0.2}
    models = {name: {"metrics": s["metrics"] | extra, "intervals": metric_intervals(s["per_example"])}
              for name, s in (("candidate", cand), ("base", base))}  # fmt: skip
    text = _gate_summary({**verdict, "version": "3", "champion_label": "none yet", "models": models})
    assert text.startswith("gate: INSUFFICIENT-EVIDENCE candidate version 3")
    assert f"why: {verdict['reason']}" in text and "failed rules: insufficient_evidence" in text
    detectable = verdict["evidence"]["golden_f1"]["detectable"]
    assert f"detectable golden_f1 difference: {detectable:.3f} with 12 items (margin 0.05, too few items)" in text
    f1 = models["candidate"]["intervals"]["golden_f1"]
    assert f"{cand['metrics']['golden_f1']:.3f} [{f1['ci_low']:.3f}, {f1['ci_high']:.3f}]" in text
