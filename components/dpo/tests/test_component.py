"""The DPO component's Python function, fed the synth and SFT components' outputs as the pipeline would."""

from __future__ import annotations

from components.dpo.component import dpo
from components.ingest.component import ingest
from components.sft.component import sft
from components.synth.component import synth
from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta


def test_dpo_component_aligns_the_sft_model(make_config, small_corpus):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = ingest.python_func(config=config.to_yaml(), parent_run_id=parent)
    data = synth.python_func(config=config.to_yaml(), parent_run_id=parent, ingest=ingested)
    tuned = sft.python_func(config=config.to_yaml(), parent_run_id=parent, synth=data, cpt="{}")
    refs = refs_from_json(dpo.python_func(config=config.to_yaml(), parent_run_id=parent, synth=data, sft=tuned))
    meta = read_meta(tracker.fetch(refs["model"]))
    assert meta["stage"] == "dpo" and meta["base"] == {"ref": refs_from_json(tuned)["model"].to_dict()}
    (run,) = tracker.stage_runs(parent, "dpo")
    assert run.data.tags["doctune.upstream.dpo"] == refs_from_json(data)["dpo"].digest
