"""The eval_gate component's Python function, fed the upstream components' outputs as the pipeline would."""

from __future__ import annotations

import json

from components.eval_gate.component import eval_gate
from components.ingest.component import ingest
from components.merge.component import merge
from components.promote.component import promote
from components.quantize.component import quantize
from components.sft.component import sft
from components.synth.component import synth
from doctune.gate import registry
from doctune.tracking import Tracker


def test_eval_gate_component_registers_the_candidate_and_its_decision_drives_promote(make_config, small_corpus):
    # A random tiny model formats no JSON and beats nothing: relax those two rules so the pass branch is exercised.
    config = make_config(small_corpus, **{"quantize.variants": "[gguf-q8_0]", "gate.rules.beat_base": False,
                                          "gate.rules.min_format_compliance": 0.0})  # fmt: skip
    yaml, tracker = config.to_yaml(), Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = ingest.python_func(config=yaml, parent_run_id=parent)
    data = synth.python_func(config=yaml, parent_run_id=parent, ingest=ingested)
    tuned = sft.python_func(config=yaml, parent_run_id=parent, synth=data, cpt="{}")
    merged = merge.python_func(config=yaml, parent_run_id=parent, dpo=tuned)
    quantized = quantize.python_func(config=yaml, parent_run_id=parent, merge=merged, synth=data)
    outputs = eval_gate.python_func(
        config=yaml, parent_run_id=parent, merge=merged, quantize=quantized, synth=data, ingest=ingested
    )
    assert outputs.decision == "promote" and json.loads(outputs.failed) == []
    assert str(registry.version_by_alias(tracker, registry.CHALLENGER).version) == outputs.version
    promote.python_func(config=yaml, parent_run_id=parent, version=outputs.version)
    assert registry.champion(tracker)[0] == outputs.version
