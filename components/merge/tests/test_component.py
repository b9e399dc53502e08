"""The merge component's Python function on the DPO-off path: the skip component hands the SFT model on."""

from __future__ import annotations

from components.ingest.component import ingest
from components.merge.component import merge
from components.sft.component import sft
from components.skip_stage.component import skip_stage
from components.synth.component import synth
from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune.train.artifacts import read_meta


def test_merge_component_folds_the_sft_adapter_when_dpo_is_off(make_config, small_corpus):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    ingested = ingest.python_func(config=config.to_yaml(), parent_run_id=parent)
    data = synth.python_func(config=config.to_yaml(), parent_run_id=parent, ingest=ingested)
    tuned = sft.python_func(config=config.to_yaml(), parent_run_id=parent, synth=data, cpt="{}")
    handed_on = skip_stage.python_func(config=config.to_yaml(), parent_run_id=parent, stage="dpo", passthrough=tuned)
    refs = refs_from_json(merge.python_func(config=config.to_yaml(), parent_run_id=parent, dpo=handed_on))
    folder = tracker.fetch(refs["model"])
    meta = read_meta(folder)
    assert meta["format"] == "full" and [link["stage"] for link in meta["lineage"]] == ["sft"]
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
