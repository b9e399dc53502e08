"""The synth component's Python function, fed the ingest component's output as the pipeline would."""

from __future__ import annotations

import json

from components.ingest.component import ingest
from components.synth.component import synth
from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker


def test_synth_component_consumes_ingest_references(make_config, small_corpus):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = ingest.python_func(config=config.to_yaml(), parent_run_id=parent)
    refs = refs_from_json(synth.python_func(config=config.to_yaml(), parent_run_id=parent, ingest=ingested))
    assert set(refs) == {"cpt", "sft", "dpo", "golden", "unanswerable", "raw", "report"}
    (run,) = tracker.stage_runs(parent, "synth")
    assert run.data.tags["doctune.upstream.chunks"] == refs_from_json(ingested)["chunks"].digest
    first = json.loads((tracker.fetch(refs["sft"]) / "train.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
