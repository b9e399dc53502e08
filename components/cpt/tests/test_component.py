"""The CPT component's Python function, fed the synth component's output as the pipeline would."""

from __future__ import annotations

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta
from doctune_kfp.components.cpt.component import cpt
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.synth.component import synth


def test_cpt_component_trains_an_adapter_from_the_synth_references(make_config, small_corpus, call_component):
    config = make_config(small_corpus, **{"cpt.max_steps": 2, "cpt.block_size": 64})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    data = call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=ingested)
    refs = refs_from_json(call_component(cpt, config=config.to_yaml(), parent_run_id=parent, datasets=data))
    assert set(refs) == {"model"} and refs["model"].kind == "model"
    (run,) = tracker.stage_runs(parent, "cpt")
    assert run.data.tags["doctune.upstream.cpt"] == refs_from_json(data)["cpt"].digest
    assert read_meta(tracker.fetch(refs["model"]))["format"] == "adapter"
