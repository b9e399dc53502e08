"""The stage runner: lineage tags, reuse of identical work, and reruns against an earlier run's artifacts."""

from __future__ import annotations

import shutil

import pytest

from doctune.stages import StageError, execute_stage, resolve_from_run
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main


def _run_ingest(config):
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("test")
    return tracker, parent, execute_stage("ingest", config, tracker, parent, {})


def test_stage_run_records_lineage(make_config, small_corpus):
    tracker, parent, result = _run_ingest(make_config(small_corpus))
    run = tracker.client.get_run(result.run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent
    assert tags["doctune.stage"] == "ingest"
    assert tags["doctune.upstream.sources"] == result.outputs["sources"].digest  # the PDFs' own content digest
    assert tags["doctune.version.transformers"] and tags["doctune.git_commit"]
    assert float(run.data.metrics["chunks"]) > 0


def test_unchanged_stage_is_reused_and_a_changed_one_is_not(make_config, small_corpus):
    config = make_config(small_corpus)
    _tracker, _, first = _run_ingest(config)
    _, _, again = _run_ingest(config)
    assert again.reused_from == first.run_id and again.outputs == first.outputs
    _, _, changed = _run_ingest(make_config(small_corpus, **{"ingest.chunking.size": 128}))
    assert changed.reused_from is None and changed.outputs["chunks"] != first.outputs["chunks"]
    # New PDF content is a new input digest: no reuse either.
    (small_corpus / "more.pdf").write_bytes((small_corpus / "sample-plain.pdf").read_bytes()[:-1] + b"\n")
    _, _, more = _run_ingest(config)
    assert more.reused_from is None


def test_rerun_from_an_earlier_run_uses_its_recorded_inputs(make_config, small_corpus, capsys):
    config = make_config(small_corpus)
    tracker, parent, first = _run_ingest(config)
    shutil.rmtree(small_corpus)  # the original folder is gone: the rerun must use the logged sources
    workdir = str(config.project.workdir)
    code = main(["stage", "ingest", "--from-run", parent, "--set", f"project.workdir={workdir}",
                 "--set", f"model.base_model={config.model.base_model}", "--set", "ingest.chunking.size=128"])  # fmt: skip
    assert code == 0
    assert f"replaces {first.run_id}" in capsys.readouterr().out
    latest = tracker.stage_runs(parent, "ingest")[0]
    assert latest.info.run_id != first.run_id
    assert latest.data.tags["doctune.replaces"] == first.run_id
    assert latest.data.tags["doctune.upstream.sources"] == first.outputs["sources"].digest
    assert latest.data.params["ingest.chunking.size"] == "128"


def test_from_run_errors_are_explained(make_config, small_corpus):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    with pytest.raises(StageError, match="no such run"):
        resolve_from_run("ingest", tracker, "0" * 32)
    empty = tracker.open_pipeline_run("empty")
    with pytest.raises(StageError, match="no finished 'ingest' stage run"):
        resolve_from_run("ingest", tracker, empty)
    with pytest.raises(StageError, match="unknown stage 'serve'"):
        resolve_from_run("serve", tracker, empty)
    with pytest.raises(StageError, match="no finished 'synth' stage run to take 'sft' from"):
        resolve_from_run("sft", tracker, empty)


def test_a_failed_stage_is_marked_failed_with_the_reason(make_config, tmp_path):
    (tmp_path / "bad.pdf").write_text("<html>")
    config = make_config(tmp_path)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("test")
    with pytest.raises(RuntimeError, match="no usable document"):
        execute_stage("ingest", config, tracker, parent, {})
    failed = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")[0]
    assert failed.info.status == "FAILED"
    assert "not a PDF" in failed.data.tags["doctune.error"]
    # The report was still logged: nothing about the input is lost.
    assert "report/ingest_report.md" in [a.path for a in tracker.client.list_artifacts(failed.info.run_id, "report")]
