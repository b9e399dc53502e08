"""The ingest component: its Python function, then the component itself under kfp.local."""

from __future__ import annotations

from components.ingest.component import ingest
from doctune.artifacts import refs_from_json
from doctune.tracking import Tracker
from pipelines.local import init_local


def test_component_function_returns_verified_references(make_config, small_corpus):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    refs = refs_from_json(ingest.python_func(config=config.to_yaml(), parent_run_id=parent))
    assert set(refs) == {"sources", "pages", "chunks", "report"}
    assert refs["chunks"].kind == "chunks"
    assert (tracker.fetch(refs["pages"]) / "pages.parquet").is_file()


def test_component_runs_under_kfp_local(make_config, small_corpus, tmp_path):
    config = make_config(small_corpus)
    parent = Tracker(config).open_pipeline_run("component-test")
    init_local(tmp_path / "kfp")
    task = ingest(config=config.to_yaml(), parent_run_id=parent)
    refs = refs_from_json(task.output)
    assert refs["chunks"].run_id == refs["pages"].run_id
