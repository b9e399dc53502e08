"""The DPO component's Python function, fed the synth and SFT components' outputs as the pipeline would."""

from __future__ import annotations

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta
from doctune_kfp.components.dpo.component import dpo
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.sft.component import sft
from doctune_kfp.components.synth.component import synth


def test_dpo_component_aligns_the_sft_model(make_config, small_corpus, call_component):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    data = call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=ingested)
    tuned = call_component(sft, config=config.to_yaml(), parent_run_id=parent, datasets=data, model="{}")
    refs = refs_from_json(call_component(dpo, config=config.to_yaml(), parent_run_id=parent, datasets=data, model=tuned))
    meta = read_meta(tracker.fetch(refs["model"]))
    assert meta["stage"] == "dpo" and meta["base"] == {"ref": refs_from_json(tuned)["model"].to_dict()}
    (run,) = tracker.stage_runs(parent, "dpo")
    assert run.data.tags["doctune.upstream.dpo"] == refs_from_json(data)["dpo"].digest
