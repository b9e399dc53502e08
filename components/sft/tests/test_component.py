"""The SFT component's Python function, with CPT switched off: the skip branch hands it no model."""

from __future__ import annotations

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.sft.component import sft
from doctune_kfp.components.skip_stage.component import skip_stage
from doctune_kfp.components.synth.component import synth


def test_sft_component_starts_from_the_base_model_when_cpt_is_off(make_config, small_corpus, call_component):
    config = make_config(small_corpus, **{"sft.max_steps": 2, "sft.max_length": 256})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    data = call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=ingested)
    no_cpt = skip_stage.python_func(config=config.to_yaml(), parent_run_id=parent, stage="cpt", passthrough="{}")
    refs = refs_from_json(call_component(sft, config=config.to_yaml(), parent_run_id=parent, datasets=data, model=no_cpt))
    assert tracker.client.get_run(parent).data.tags["doctune.skipped.cpt"] == "true"
    meta = read_meta(tracker.fetch(refs["model"]))
    assert meta["base"] == {"spec": config.model.base_model} and meta["stage"] == "sft"
