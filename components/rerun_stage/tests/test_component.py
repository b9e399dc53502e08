"""The rerun component: one stage of an earlier pipeline run rerun on its recorded inputs, under kfp.local."""

from __future__ import annotations

from doctune.artifacts import refs_from_json
from doctune.stages import execute_stage
from doctune.tracking import TAG, Tracker
from doctune_kfp.components.rerun_stage.component import rerun_stage_component
from doctune_kfp.pipelines.local import init_local


def test_rerun_component_adds_a_stage_run_that_records_the_one_it_replaces(make_config, small_corpus, call_component, tmp_path):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("rerun-test")
    first = execute_stage("ingest", config, tracker, parent, {})
    changed = make_config(small_corpus, **{"ingest.chunking.size": 200, "ingest.chunking.overlap": 20})
    init_local(tmp_path / "kfp")
    task = rerun_stage_component("ingest")(config=changed.to_yaml(), stage="ingest", from_run=first.run_id)
    refs = refs_from_json(task.output)
    new_run = tracker.client.get_run(refs["chunks"].run_id)
    assert new_run.data.tags[f"{TAG}replaces"] == first.run_id
    assert new_run.data.tags["mlflow.parentRunId"] == parent  # nested under the earlier pipeline run
    assert refs["chunks"].digest != first.outputs["chunks"].digest  # smaller chunks: a new result, not a reuse
