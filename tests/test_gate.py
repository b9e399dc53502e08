"""Eval gate: metric functions against hand-computed values, the decision rules, and the registry flow on the
tiny model (first run against the base, promotion, a damaged candidate rejected, rollback, same decision twice)."""

from __future__ import annotations

import json

import pytest
import torch

from doctune.artifacts import MODEL_KIND
from doctune.chat import ABSTENTIONS
from doctune.gate import registry
from doctune.gate.metrics import (
    abstains,
    exact_match,
    paired_randomization_p,
    probe_passes,
    rouge_l,
    token_f1,
)
from doctune.gate.rules import decide, gated_variants
from doctune.gate.stage import REPORT_FILE, read_decision
from doctune.stages import execute_stage, promote_component, reject_component
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main


def test_answer_metrics_match_hand_computed_values():
    assert exact_match("The Debian installer.", "debian installer") == 1.0
    # "apt installs the package" normalises to 3 tokens ("the" goes), 2 of them in the reference: P = R = F1 = 2/3
    assert token_f1("apt installs the package", "apt installs packages") == pytest.approx(2 / 3)
    assert token_f1("apt", "apt installs packages") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    # LCS of [w x y z] and [w y z q] is [w y z]: P = R = 3/4
    assert rouge_l("w x y z", "w y z q") == pytest.approx(0.75)
    assert rouge_l("x y", "a b") == 0.0 and token_f1("", "") == 1.0
    assert abstains("I cannot answer that from the provided documentation.", ABSTENTIONS.values())
    assert abstains("Sorry, the context does not contain this.", ["I cannot answer that."])
    assert not abstains("Run apt-get install.", ABSTENTIONS.values())
    # A sentence of any language counts: a model may decline a French question in English, or the reverse.
    assert abstains(ABSTENTIONS["fr"], ABSTENTIONS.values())
    assert not abstains("Le paquet est installé par apt.", ABSTENTIONS.values())


def test_probe_checks():
    assert probe_passes("The answer is 1,024.", {"type": "number", "value": 1024})
    assert not probe_passes("about 1000", {"type": "number", "value": 1024})
    assert probe_passes("It is Paris.", {"type": "contains_any", "values": ["paris"]})
    assert not probe_passes("Parisian", {"type": "contains_any", "values": ["paris"]})
    assert probe_passes("RIVER", {"type": "contains_any", "values": ["RIVER"], "case_sensitive": True})
    assert probe_passes("red, green, blue", {"type": "item_count", "value": 3, "separator": ","})
    schema = {"name": "string", "age": "integer"}
    assert probe_passes('```json\n{"name": "Ada", "age": 36}\n```', {"type": "json", "schema": schema})
    assert not probe_passes('{"name": "Ada", "age": "36"}', {"type": "json", "schema": schema})
    assert not probe_passes('{"name": "Ada", "age": true}', {"type": "json", "schema": schema})


def test_paired_randomization_flags_a_consistently_worse_candidate():
    champion = [0.8, 0.7, 0.9, 0.6, 0.85, 0.75, 0.9, 0.8, 0.7, 0.65, 0.8, 0.9]
    worse = [c - 0.3 for c in champion]
    assert paired_randomization_p(worse, champion) < 0.01
    assert paired_randomization_p(champion, champion) == 1.0
    assert paired_randomization_p([c + 0.1 for c in champion], champion) > 0.5


def scores(f1: float, abstention: float = 0.8, n: int = 400, **extra) -> dict:
    """A model's scores as evaluate_model returns them: `n` items per set, enough to detect the default margins."""
    metrics = {"golden_f1": f1, "abstention_accuracy": abstention, "false_abstention_rate": 0.05, "format_compliance": 1.0,
               "capability_accuracy": 0.6, "citation_precision": 0.9, "general_perplexity": 20.0,
               "domain_perplexity": 10.0} | extra  # fmt: skip
    declined = round(abstention * n)
    spread = [f1 + 0.1, f1 - 0.1] * (n // 2)  # items vary, as real ones do: a constant list has no measurable power
    return {"metrics": metrics, "per_example": {"golden_f1": spread, "abstained": [1.0] * declined + [0.0] * (n - declined),
                                                **citing(metrics["citation_precision"], n)}}  # fmt: skip


def citing(precision: float, n: int) -> dict:
    """Per-item citation lists of a model that cites one passage per answer, `precision` of them holding it."""
    right = round(precision * n)
    return {"citations_made": [1.0] * n, "citations_supported": [1.0] * right + [0.0] * (n - right),
            "source_cited": [1.0] * right + [0.0] * (n - right)}  # fmt: skip


def test_rules_name_every_failure(make_config):
    rules = make_config().gate.rules
    good = decide({"candidate": scores(0.5), "champion": scores(0.4), "base": scores(0.3)}, {"gguf-q8_0": 1.01}, rules)
    assert good["decision"] == "promote" and good["failed"] == []
    bad = decide(
        {"candidate": scores(0.2, general_perplexity=40.0, domain_perplexity=12.0), "champion": scores(0.4), "base": scores(0.3)},
        {"gguf-q8_0": 1.05, "nf4": None},
        rules,
    )
    assert bad["decision"] == "reject"
    assert {"golden_f1_vs_champion", "golden_f1_beats_base", "general_perplexity_vs_base", "domain_perplexity_vs_base",
            "perplexity_ratio:gguf-q8_0", "perplexity_ratio:nf4",
            "not_significantly_worse:golden_f1"} <= set(bad["failed"])  # fmt: skip
    assert "insufficient_evidence" not in bad["failed"]  # 400 items per set detect the margins


def test_q4_k_m_ships_where_it_keeps_the_perplexity_else_its_fallback_q8_0(make_config):
    config = make_config()
    g = config.gate
    assert (g.variants, g.variant_fallbacks) == (["gguf-q4_k_m"], {"gguf-q4_k_m": "gguf-q8_0"})
    max_ratio = g.rules.max_quantized_ppl_ratio

    def choose(**ratios):
        return gated_variants(g.variants, g.variant_fallbacks, {k.replace("_", "-", 1): v for k, v in ratios.items()}, max_ratio)

    assert choose(gguf_q4_k_m=1.01, gguf_q8_0=1.004) == (["gguf-q4_k_m"], {})
    gated, replaced = choose(gguf_q4_k_m=1.024, gguf_q8_0=1.004)
    assert gated == ["gguf-q8_0"] and replaced == {"gguf-q8_0": f"in place of gguf-q4_k_m: perplexity ratio 1.0240 > {max_ratio}"}
    assert choose(gguf_q8_0=1.004) == (["gguf-q8_0"], {"gguf-q8_0": "in place of gguf-q4_k_m: not produced"})
    # Neither within the ratio: the variant asked for is gated, and its rule fails (no silent downgrade to nothing).
    gated, replaced = choose(gguf_q4_k_m=1.03, gguf_q8_0=1.05)
    assert gated == ["gguf-q4_k_m"] and not replaced
    outcome = decide({"candidate": scores(0.5), "champion": scores(0.4), "base": scores(0.3)}, {"gguf-q4_k_m": 1.03}, g.rules)
    assert "perplexity_ratio:gguf-q4_k_m" in outcome["failed"]
    # Chains are followed; a loop is refused when the config is read.
    chain = gated_variants(["a"], {"a": "b", "b": "c"}, {"a": 1.5, "b": None, "c": 1.0}, 1.02)
    assert chain == (["c"], {"c": "in place of a: perplexity ratio 1.5000 > 1.02; in place of b: not produced"})
    with pytest.raises(ValueError, match="variant_fallbacks loop: a -> b -> a"):
        make_config(**{"gate.variant_fallbacks": "{a: b, b: a}"})


def test_beating_the_base_takes_a_significant_margin(make_config):
    rules = make_config().gate.rules
    base = scores(0.3, n=12)
    noisy = scores(0.35, n=12)
    noisy["per_example"]["golden_f1"] = [0.9, 0.0, 0.9, 0.0] + [0.3] * 8  # higher on average, on 4 of 12 questions
    verdict = decide({"candidate": noisy, "champion": base, "base": base}, {}, rules)
    assert "golden_f1_beats_base" in verdict["failed"]
    assert verdict["decision"] == "insufficient-evidence"  # 12 items cannot show a difference of 0.05 either
    steady = decide({"candidate": scores(0.35), "champion": scores(0.3), "base": scores(0.3)}, {}, rules)
    assert steady["decision"] == "promote"
    (rule,) = [r for r in steady["rules"] if r["name"] == "golden_f1_beats_base"]
    assert rule["value"] < rules.alpha


def test_citation_precision_is_held_to_the_champions_within_its_uncertainty(make_config):
    rules = make_config().gate.rules
    base = scores(0.3, citation_precision=0.0)  # a base model that cites nothing: no floor before a first promotion
    first = decide({"candidate": scores(0.5, citation_precision=0.5), "champion": base, "base": base}, {}, rules)
    assert first["decision"] == "promote"
    worse = decide({"candidate": scores(0.5, citation_precision=0.6), "champion": scores(0.4), "base": base}, {}, rules)
    assert {"citation_precision_vs_champion", "not_significantly_worse:source_cited"} <= set(worse["failed"])
    # A champion right on its only citation is no ground to reject a candidate right on 85% of 400.
    lucky = scores(0.4, citation_precision=1.0)
    lucky["per_example"] |= {k: [1.0] + [0.0] * 399 for k in ("citations_made", "citations_supported", "source_cited")}
    fair = decide({"candidate": scores(0.5, citation_precision=0.85), "champion": lucky, "base": base}, {}, rules)
    assert fair["decision"] == "promote"


def test_structured_output_bar_is_the_base_models_share_where_that_is_lower(make_config):
    rules = make_config().gate.rules
    weak_base = scores(0.3, format_compliance=0.4)
    kept = decide({"candidate": scores(0.5, format_compliance=0.4), "champion": weak_base, "base": weak_base}, {}, rules)
    lost = decide({"candidate": scores(0.5, format_compliance=0.33), "champion": weak_base, "base": weak_base}, {}, rules)
    assert kept["decision"] == "promote" and lost["failed"] == ["format_compliance"]
    strong_base = scores(0.3, format_compliance=1.0)
    short = decide({"candidate": scores(0.5, format_compliance=0.9), "champion": strong_base, "base": strong_base}, {}, rules)
    assert short["failed"] == ["format_compliance"]


# -- the gate stage and the registry on the tiny model --------------------------------------------------

# A random tiny model formats nothing, abstains at random, and a handful of items has no power: the promote path
# runs with these bars off.
LENIENT = {
    "gate.rules.beat_base": False,
    "gate.rules.min_format_compliance": 0.0,
    "gate.rules.min_abstention_accuracy": 0.0,
    "gate.rules.max_false_abstention": 1.0,
    "gate.rules.max_domain_ppl_vs_base": 100.0,
    "gate.rules.min_detectable_f1": 1.0,
    "gate.rules.min_detectable_abstention": 1.0,
}


@pytest.fixture
def candidate(make_config, small_corpus):
    """ingest -> synth -> SFT -> merge -> quantize on the tiny model; the gate's inputs, as the pipeline hands them on."""
    config = make_config(small_corpus, **LENIENT, **{"quantize.variants": "[gguf-q8_0]"})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("gate-test")
    ingested = execute_stage("ingest", config, tracker, parent, {})
    data = execute_stage("synth", config, tracker, parent, {k: ingested.outputs[k] for k in ("chunks", "pages")}).outputs
    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    merged = execute_stage("merge", config, tracker, parent, {"model": sft.outputs["model"]}).outputs["model"]
    quantized = execute_stage("quantize", config, tracker, parent, {"model": merged, "heldout": data["heldout"]}).outputs[
        "report"
    ]
    inputs = {"model": merged, "quantized": quantized, "chunks": ingested.outputs["chunks"]}
    inputs |= {k: data[k] for k in ("golden", "unanswerable", "heldout")}
    return config, tracker, parent, inputs


def gate(config, tracker, parent, inputs) -> dict:
    result = execute_stage("eval_gate", config, tracker, parent, inputs)
    return {"run": result.run_id, **json.loads((tracker.fetch(result.outputs["report"]) / REPORT_FILE).read_text())}


def test_first_run_is_compared_with_the_base_promoted_and_rolled_back(candidate, capsys):
    config, tracker, parent, inputs = candidate
    first = gate(config, tracker, parent, inputs)
    assert first["champion_label"].startswith("none yet") and "champion" not in first["models"]
    assert {"candidate", "candidate gguf-q8_0", "base"} <= set(first["models"])
    assert first["decision"] == "promote", first["failed"]
    ratio_rule = next(r for r in first["rules"] if r["name"] == "perplexity_ratio:gguf-q8_0")  # q4_k_m was not made here
    assert "in place of gguf-q4_k_m: not produced" in ratio_rule["detail"]
    # Every per-item metric with its interval and item count; the sets' power and closed book vs RAG reported.
    golden_n = len(first["items"]["golden"])
    f1 = first["models"]["candidate"]["intervals"]["golden_f1"]
    assert f1["n"] == golden_n and f1["ci_low"] <= first["models"]["candidate"]["metrics"]["golden_f1"] <= f1["ci_high"]
    assert first["evidence"]["golden_f1"]["n"] == golden_n and first["evidence"]["golden_f1"]["sufficient"]
    assert first["closed_book_vs_rag"]["candidate"]["closed_book"]["n"] == first["items"]["closed_book"] == golden_n
    assert "closed_book_f1" in first["models"]["base"]["metrics"]
    # The conformal abstention threshold: scored on every unanswerable item, split, ruled on and shipped as a tag.
    unanswerable_n = len(first["items"]["unanswerable"])
    bound = first["abstention_bound"]["candidate gguf-q8_0"]
    assert bound["calibration_items"] + bound["test_items"] == unanswerable_n
    assert len(first["models"]["candidate gguf-q8_0"]["per_example"]["abstention_score"]) == unanswerable_n
    assert all(s < 0 for s in first["models"]["candidate"]["per_example"]["golden_abstention_score"])  # log-probabilities
    assert "hallucination_bound" in {r["name"] for r in first["rules"]}
    tags = registry.version_by_alias(tracker, registry.CHALLENGER).tags
    assert {"doctune.abstention_threshold", "doctune.abstention_threshold.gguf-q8_0"} <= set(tags)
    assert str(registry.version_by_alias(tracker, registry.CHALLENGER).version) == first["version"]
    assert registry.champion(tracker) is None  # the gate decides; the promote step moves the alias
    promote_component(config.to_yaml(), parent, first["version"])
    assert registry.champion(tracker)[0] == first["version"]

    # The same inputs against the same champion: the same decision, scored afresh and from the score cache.
    assert not any(m["cached"] for m in first["models"].values())
    rerun = config.model_copy(update={"tracking": config.tracking.model_copy(update={"reuse_stage_results": False})})
    uncached = rerun.model_copy(update={"gate": rerun.gate.model_copy(update={"cache_scores": False})})
    again, repeat = gate(uncached, tracker, parent, inputs), gate(rerun, tracker, parent, inputs)
    assert not any(m["cached"] for m in again["models"].values()) and all(m["cached"] for m in repeat["models"].values())
    assert again["decision"] == repeat["decision"] and again["rules"] == repeat["rules"]
    for name, model in again["models"].items():
        timings = ("tokens_per_s", "scoring_seconds")
        timing_free = {k: v for k, v in model["metrics"].items() if k not in timings}
        assert timing_free == {k: v for k, v in repeat["models"][name]["metrics"].items() if k not in timings}
        assert model["per_example"] == repeat["models"][name]["per_example"]
    assert again["champion_label"].startswith(f"version {first['version']}")

    report = tracker.fetch(execute_stage("eval_gate", config, tracker, parent, inputs).outputs["report"])
    html = (report / "gate_report.html").read_text()
    assert "golden F1 (RAG)" in html and "<img" in html and (report / "metrics.png").stat().st_size > 0
    assert "What the eval sets can detect" in html and "Closed book vs RAG" in html and "per question type" in html
    assert "Abstention with a stated bound" in html

    # A human promotes the newest version, then rolls back: the first champion serves again; both recorded.
    args = ["--set", f"project.workdir={config.project.workdir}"]
    assert main(["promote", repeat["version"], *args]) == 0
    assert registry.champion(tracker)[0] == repeat["version"]
    assert str(registry.version_by_alias(tracker, registry.PREVIOUS).version) == first["version"]
    assert main(["rollback", *args]) == 0
    assert registry.champion(tracker)[0] == first["version"]
    assert "champion -> version" in capsys.readouterr().out
    actions = tracker.client.search_runs([tracker.experiment_id], "tags.`doctune.kind` = 'registry'")
    assert sorted(r.data.tags["doctune.action"] for r in actions) == ["promote", "promote", "rollback"]
    assert main(["rollback", *args]) == 2  # nothing older to go back to: explained, not a traceback


def test_a_damaged_candidate_is_never_promoted(candidate):
    config, tracker, parent, inputs = candidate
    first = gate(config, tracker, parent, inputs)
    promote_component(config.to_yaml(), parent, first["version"])

    from transformers import AutoModelForCausalLM

    folder = tracker.fetch(inputs["model"])
    damaged = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        damaged.model.embed_tokens.weight.mul_(40.0)  # tied with the output layer: confidently wrong next tokens
    target = config.project.workdir / "damaged"
    damaged.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "doctune_model.json", "system_prompt.txt"):
        if (folder / name).is_file():
            (target / name).write_bytes((folder / name).read_bytes())
    run = tracker.start_stage_run("merge", parent, {})
    ref = run.log_output("model", target, kind=MODEL_KIND)
    run.finish({"model": ref})

    result = gate(config, tracker, parent, inputs | {"model": ref})
    assert result["decision"] == "reject"
    assert "general_perplexity_vs_base" in result["failed"], result["failed"]
    refs = json.dumps({"report": tracker.outputs_of(tracker.client.get_run(result["run"]))["report"].to_dict()})
    assert read_decision(refs, tracker.fetch) == {"decision": "reject", "version": result["version"], "failed": result["failed"]}
    reject_component(config.to_yaml(), parent, result["version"], json.dumps(result["failed"]))
    assert registry.champion(tracker)[0] == first["version"]
    version = tracker.client.get_model_version(config.project.name, result["version"])
    assert "general_perplexity_vs_base" in version.tags["doctune.rejected"]
    assert version.tags["doctune.gate_decision"] == "reject"


def test_a_corpus_too_small_for_the_margin_is_insufficient_evidence(candidate):
    """Two PDFs give a dozen golden items: no promote or reject can rest on them, and the report says what they
    could detect."""
    config, tracker, parent, inputs = candidate
    rules = config.gate.rules.model_copy(update={"min_detectable_f1": 0.05, "min_detectable_abstention": 0.15})
    strict = config.model_copy(update={"gate": config.gate.model_copy(update={"rules": rules})})
    report = gate(strict, tracker, parent, inputs)
    assert report["decision"] == "insufficient-evidence" and report["failed"][0] == "insufficient_evidence"
    evidence = report["evidence"]["golden_f1"]
    assert evidence["n"] == len(report["items"]["golden"]) < 100 and evidence["detectable"] > 0.05
    assert f"detect an F1 difference of {evidence['detectable']:.3f}" in report["reason"]
    result = tracker.client.get_run(report["run"])
    markdown = (tracker.fetch(tracker.outputs_of(result)["report"]) / "gate_report.md").read_text()
    assert "INSUFFICIENT-EVIDENCE" in markdown and f"{evidence['detectable']:.3f}" in markdown
    assert registry.champion(tracker) is None  # recorded like a rejection: nothing promoted


def test_the_production_set_is_scored_and_the_judge_is_asked_both_orders(candidate):
    """Relabeled served failures (synth's production.jsonl beside golden) are scored by every model; with a judge
    configured, its verdicts are a rule, a report section and an artifact."""
    import shutil

    from test_synth import _Endpoint

    config, tracker, parent, inputs = candidate
    golden = tracker.fetch(inputs["golden"])
    folder = config.project.workdir / "golden-with-production"
    shutil.copytree(golden, folder)
    system = {"role": "system", "content": "You answer questions about the manual."}
    rows = [{"messages": [system, {"role": "user", "content": f"Which tool does the manual document? (item {n})"}],
             "answer": "CamlIDL.", "meta": {"question": f"q{n}"}} for n in range(3)]  # fmt: skip
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})  # unusable: listed, not fatal
    (folder / "production.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tracker.start_stage_run("synth", parent, {})
    inputs = {**inputs, "golden": run.log_output("golden", folder, kind="eval_dataset")}
    run.finish({"golden": inputs["golden"]})

    endpoint = _Endpoint(lambda n, body: (200, json.dumps({"better": "A"})))  # position-biased: every verdict a tie
    try:
        judged = config.model_copy(update={"gate": config.gate.model_copy(update={
            "judge": config.gate.judge.model_copy(update={"enabled": True, "endpoint": config.gate.judge.endpoint.model_copy(
                update={"base_url": endpoint.url, "max_retries": 0})})})})  # fmt: skip
        report = gate(judged, tracker, parent, inputs)
    finally:
        endpoint.close()
    assert report["items"]["production"] == 3
    assert report["models"]["candidate"]["intervals"]["production_f1"]["n"] == 3
    assert len(report["models"]["base"]["per_example"]["production_f1"]) == 3
    assert any("not a production eval record" in s["reason"] for s in report["skipped"])
    assert report["judge"]["sets"]["production"]["n"] == 3 and report["judge"]["overall"]["win_rate"]["mean"] == 0.5
    (rule,) = [r for r in report["rules"] if r["name"] == "judge_win_rate"]
    assert rule["passed"] and rule["value"] == 0.5
    folder = tracker.fetch(tracker.outputs_of(tracker.client.get_run(report["run"]))["report"])
    verdicts = [json.loads(line) for line in (folder / "judge_verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == report["judge"]["overall"]["n"] and {v["winner"] for v in verdicts} == {"tie"}
    assert (
        "Pairwise judge" in (folder / "gate_report.md").read_text() and "production F1" in (folder / "gate_report.md").read_text()
    )
