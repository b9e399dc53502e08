"""The quantize component's Python function, fed the merge and synth outputs as the pipeline would."""

from __future__ import annotations

import json

from components.ingest.component import ingest
from components.merge.component import merge
from components.quantize.component import quantize
from components.sft.component import sft
from components.synth.component import synth
from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker


def test_quantize_component_produces_each_configured_variant(make_config, small_corpus):
    config = make_config(small_corpus, **{"quantize.variants": "[gguf-q8_0, gguf-q4_0]"})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = ingest.python_func(config=config.to_yaml(), parent_run_id=parent)
    data = synth.python_func(config=config.to_yaml(), parent_run_id=parent, ingest=ingested)
    tuned = sft.python_func(config=config.to_yaml(), parent_run_id=parent, synth=data, cpt="{}")
    merged = merge.python_func(config=config.to_yaml(), parent_run_id=parent, dpo=tuned)
    refs = refs_from_json(quantize.python_func(config=config.to_yaml(), parent_run_id=parent, merge=merged, synth=data))
    assert set(refs) == {"gguf-q8_0", "gguf-q4_0", "report"}
    report = json.loads((tracker.fetch(refs["report"]) / "quantize_report.json").read_text())
    assert report["variants"]["gguf-q4_0"]["size_bytes"] < report["variants"]["gguf-q8_0"]["size_bytes"]
    (run,) = tracker.stage_runs(parent, "quantize")
    assert run.data.tags["doctune.upstream.model"] == refs_from_json(merged)["model"].digest
