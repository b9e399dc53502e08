"""The SFT component's Python function, with CPT switched off: the skip branch hands it no model."""

from __future__ import annotations

from components.ingest.component import ingest
from components.sft.component import sft
from components.skip_stage.component import skip_stage
from components.synth.component import synth
from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta


def test_sft_component_starts_from_the_base_model_when_cpt_is_off(make_config, small_corpus):
    config = make_config(small_corpus, **{"sft.max_steps": 2, "sft.max_length": 256})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = ingest.python_func(config=config.to_yaml(), parent_run_id=parent)
    data = synth.python_func(config=config.to_yaml(), parent_run_id=parent, ingest=ingested)
    no_cpt = skip_stage.python_func(config=config.to_yaml(), parent_run_id=parent, stage="cpt", passthrough="{}")
    refs = refs_from_json(sft.python_func(config=config.to_yaml(), parent_run_id=parent, synth=data, cpt=no_cpt))
    assert tracker.client.get_run(parent).data.tags["doctune.skipped.cpt"] == "true"
    meta = read_meta(tracker.fetch(refs["model"]))
    assert meta["base"] == {"spec": config.model.base_model} and meta["stage"] == "sft"
