"""The synth component's Python function, fed the ingest component's output as the pipeline would."""

from __future__ import annotations

import json

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.synth.component import synth


def test_synth_component_consumes_ingest_references(make_config, small_corpus, call_component):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    refs = refs_from_json(call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=ingested))
    assert set(refs) == {"cpt", "heldout", "sft", "dpo", "golden", "unanswerable", "raw", "report"}
    (run,) = tracker.stage_runs(parent, "synth")
    assert run.data.tags["doctune.upstream.chunks"] == refs_from_json(ingested)["chunks"].digest
    first = json.loads((tracker.fetch(refs["sft"]) / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
