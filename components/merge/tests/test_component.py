"""The merge component's Python function on the DPO-off path: the skip component hands the SFT model on."""

from __future__ import annotations

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.merge.component import merge
from doctune_kfp.components.sft.component import sft
from doctune_kfp.components.skip_stage.component import skip_stage
from doctune_kfp.components.synth.component import synth


def test_merge_component_folds_the_sft_adapter_when_dpo_is_off(make_config, small_corpus, call_component):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    data = call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=ingested)
    tuned = call_component(sft, config=config.to_yaml(), parent_run_id=parent, datasets=data, model="{}")
    handed_on = skip_stage.python_func(config=config.to_yaml(), parent_run_id=parent, stage="dpo", passthrough=tuned)
    refs = refs_from_json(call_component(merge, config=config.to_yaml(), parent_run_id=parent, model=handed_on))
    folder = tracker.fetch(refs["model"])
    meta = read_meta(folder)
    assert meta["format"] == "full" and [link["stage"] for link in meta["lineage"]] == ["sft"]
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
