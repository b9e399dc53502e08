"""The ingest component: its Python function, then the component itself under kfp.local."""

from __future__ import annotations

from pathlib import Path

from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.pipelines.local import init_local


def test_component_function_returns_verified_references(make_config, small_corpus, call_component):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    refs = refs_from_json(call_component(ingest, config=config.to_yaml(), parent_run_id=parent))
    assert set(refs) == {"sources", "pages", "chunks", "report"}
    assert refs["chunks"].kind == "chunks"
    assert (tracker.fetch(refs["pages"]) / "pages.parquet").is_file()


def test_component_runs_under_kfp_local(make_config, small_corpus, call_component, tmp_path):
    config = make_config(small_corpus)
    parent = Tracker(config).open_pipeline_run("component-test")
    init_local(tmp_path / "kfp")
    task = ingest(config=config.to_yaml(), parent_run_id=parent)
    refs = refs_from_json(task.outputs["refs"])
    assert refs["chunks"].run_id == refs["pages"].run_id
    # Kubeflow sees typed artifacts that point at the MLflow artifacts and carry their digests.
    chunks = task.outputs["chunks_dataset"]
    run = Tracker(config).client.get_run(refs["chunks"].run_id)
    assert chunks.uri == f"{run.info.artifact_uri}/chunks"
    assert chunks.metadata["digest"] == refs["chunks"].digest and chunks.metadata["mlflow_run_id"] == run.info.run_id
    assert Path(task.outputs["ingest_report"].path).read_text().startswith("# Ingest report")
