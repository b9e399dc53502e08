"""The quantize component's Python function, fed the merge and synth outputs as the pipeline would."""

from __future__ import annotations

import json

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.merge.component import merge
from doctune_kfp.components.quantize.component import quantize
from doctune_kfp.components.sft.component import sft
from doctune_kfp.components.synth.component import synth


def test_quantize_component_produces_each_configured_variant(make_config, small_corpus, call_component):
    config = make_config(small_corpus, **{"quantize.variants": "[gguf-q8_0, gguf-q4_0]"})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    data = call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=ingested)
    tuned = call_component(sft, config=config.to_yaml(), parent_run_id=parent, datasets=data, model="{}")
    merged = call_component(merge, config=config.to_yaml(), parent_run_id=parent, model=tuned)
    refs = refs_from_json(call_component(quantize, config=config.to_yaml(), parent_run_id=parent, model=merged, datasets=data))
    assert set(refs) == {"gguf-q8_0", "gguf-q4_0", "report"}
    report = json.loads((tracker.fetch(refs["report"]) / "quantize_report.json").read_text())
    assert report["variants"]["gguf-q4_0"]["size_bytes"] < report["variants"]["gguf-q8_0"]["size_bytes"]
    (run,) = tracker.stage_runs(parent, "quantize")
    assert run.data.tags["doctune.upstream.model"] == refs_from_json(merged)["model"].digest
