"""The eval_gate component's Python function, fed the upstream components' outputs as the pipeline would."""

from __future__ import annotations

import json
from pathlib import Path

from doctune.artifacts import refs_from_json
from doctune.gate import registry
from doctune.tracking import Tracker
from doctune_kfp.components.eval_gate.component import eval_gate
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.merge.component import merge
from doctune_kfp.components.promote.component import promote
from doctune_kfp.components.quantize.component import quantize
from doctune_kfp.components.sft.component import sft
from doctune_kfp.components.synth.component import synth


def test_eval_gate_component_registers_the_candidate_and_its_decision_drives_promote(
    make_config, small_corpus, call_component, kfp_outputs
):
    # A random tiny model formats no JSON, beats nothing and abstains at random, and a handful of items has no power:
    # relax those rules so the pass branch is exercised.
    config = make_config(small_corpus, **{"quantize.variants": "[gguf-q8_0]", "gate.rules.beat_base": False,
                                          "gate.rules.min_format_compliance": 0.0, "gate.rules.min_abstention_accuracy": 0.0,
                                          "gate.rules.max_false_abstention": 1.0, "gate.rules.max_domain_ppl_vs_base": 100.0,
                                          "gate.rules.min_detectable_f1": 1.0,
                                          "gate.rules.min_detectable_abstention": 1.0})  # fmt: skip
    yaml, tracker = config.to_yaml(), Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=yaml, parent_run_id=parent)
    data = call_component(synth, config=yaml, parent_run_id=parent, documents=ingested)
    tuned = call_component(sft, config=yaml, parent_run_id=parent, datasets=data, model="{}")
    merged = call_component(merge, config=yaml, parent_run_id=parent, model=tuned)
    quantized = call_component(quantize, config=yaml, parent_run_id=parent, model=merged, datasets=data)
    typed = kfp_outputs(eval_gate)
    outputs = eval_gate.python_func(
        config=yaml,
        parent_run_id=parent,
        model=merged,
        quantized=quantized,
        datasets=data,
        documents=ingested,
        retriever="{}",
        **typed,
    )
    assert outputs.decision == "promote" and json.loads(outputs.failed) == []
    assert str(registry.version_by_alias(tracker, registry.CHALLENGER).version) == outputs.version
    promote.python_func(config=yaml, parent_run_id=parent, version=outputs.version)
    assert registry.champion(tracker)[0] == outputs.version
    # The report and the metrics are Kubeflow artifacts too: the HTML page whole (charts inlined), the scores.
    page = Path(typed["gate_report"].path).read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    assert typed["gate_report"].metadata["digest"] == refs_from_json(outputs.refs)["report"].digest
    assert 0 <= typed["gate_metrics"].metadata["gate.candidate.golden_f1"] <= 1
