"""Artifacts by reference: manifests, digest checks on fetch, tampering, and a real MLflow server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import free_port
from doctune.artifacts import ArtifactIntegrityError, ArtifactRef, refs_from_json, refs_to_json
from doctune.stages import execute_stage
from doctune.tracking import Tracker


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(b"\x00\x01beta")
    return folder


def _stage_run(config):
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("test")
    return tracker, tracker.start_stage_run("ingest", parent, {})


def test_logged_output_round_trips_with_its_digest(make_config, tmp_path):
    tracker, run = _stage_run(make_config())
    ref = run.log_output("things", _folder(tmp_path), kind="test")
    assert ref.digest.startswith("sha256:") and ref.run_id == run.run_id
    # A consumer elsewhere (its own workdir, so no shared cache) gets the same bytes.
    other = Tracker(make_config(**{"project.workdir": str(tmp_path / "elsewhere"), "tracking.uri": tracker.uri}))
    fetched = other.fetch(ref)
    assert (fetched / "a.txt").read_text() == "alpha"
    assert (fetched / "sub" / "b.bin").read_bytes() == b"\x00\x01beta"
    assert refs_from_json(refs_to_json({"things": ref})) == {"things": ref}


def test_an_empty_output_is_refused(make_config, tmp_path):
    _, run = _stage_run(make_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        run.log_output("nothing", tmp_path / "empty", kind="test")


def test_tampered_artifact_is_rejected_and_nothing_is_kept(make_config, tmp_path):
    tracker, run = _stage_run(make_config())
    ref = run.log_output("things", _folder(tmp_path), kind="test")
    stored = Path(tracker.client.get_run(ref.run_id).info.artifact_uri.removeprefix("file://")) / "things" / "a.txt"
    stored.write_text("ALPHA")
    consumer = Tracker(make_config(**{"project.workdir": str(tmp_path / "consumer"), "tracking.uri": tracker.uri}))
    with pytest.raises(ArtifactIntegrityError, match=r"file a.txt has sha256 .*tampered"):
        consumer.fetch(ref)
    assert not [entry for entry, _ in consumer.cache.entries() if entry.startswith("artifacts/")]
    assert not [p for p in (consumer.cache.root / "artifacts").glob(".*") if not p.name.endswith(".lock")]  # no scratch


def test_a_reference_with_the_wrong_digest_is_rejected(make_config, tmp_path):
    tracker, run = _stage_run(make_config())
    ref = run.log_output("things", _folder(tmp_path), kind="test")
    forged = ArtifactRef(ref.run_id, ref.artifact_path, "sha256:" + "0" * 64, ref.kind)
    with pytest.raises(ArtifactIntegrityError, match="does not match the reference"):
        tracker.fetch(forged)


def test_malformed_references_are_explained():
    with pytest.raises(ValueError, match="lacks digest"):
        refs_from_json('{"chunks": {"run_id": "r", "artifact_path": "chunks", "kind": "chunks"}}')
    with pytest.raises(ValueError, match="not valid JSON"):
        refs_from_json("{nope")


@pytest.fixture
def mlflow_server(tmp_path, start_server):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and a local artifact destination."""
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]  # fmt: skip
    start_server(command, f"http://127.0.0.1:{port}/health", timeout=90)
    return f"http://127.0.0.1:{port}", artifacts


@pytest.mark.server
def test_ingest_through_a_real_mlflow_server(mlflow_server, make_config, small_corpus, tmp_path):
    url, artifacts = mlflow_server
    config = make_config(small_corpus, **{"tracking.uri": url})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("server-test")
    result = execute_stage("ingest", config, tracker, parent, {})
    assert set(result.outputs) == {"sources", "pages", "chunks", "report"}

    consumer = Tracker(make_config(small_corpus, **{"tracking.uri": url, "project.workdir": str(tmp_path / "consumer")}))
    chunks = consumer.fetch(result.outputs["chunks"])
    assert (chunks / "chunks.parquet").stat().st_size > 0
    run = consumer.client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["doctune.output.chunks"] == result.outputs["chunks"].digest
    assert run.data.params["ingest.chunking.size"] == "384"

    stored = next(artifacts.rglob("chunks.parquet"))
    stored.write_bytes(stored.read_bytes()[:-10] + b"0123456789")
    third = Tracker(make_config(small_corpus, **{"tracking.uri": url, "project.workdir": str(tmp_path / "third")}))
    with pytest.raises(ArtifactIntegrityError, match="chunks.parquet"):
        third.fetch(result.outputs["chunks"])


@pytest.mark.server
def test_the_store_check_through_a_real_server_accepts_empty_files_and_catches_a_changed_size(
    mlflow_server, make_config, tmp_path
):
    """Through the artifact proxy an empty file is listed without a size; the check must not call it missing."""
    url, artifacts = mlflow_server
    tracker, run = _stage_run(make_config(**{"tracking.uri": url}))
    folder = _folder(tmp_path)
    (folder / "validation.jsonl").write_text("")  # an empty split, as synth writes for a small corpus
    ref = run.log_output("things", folder, kind="test")
    tracker.verify_stored(ref)
    tracker.verify_stored(ref, full=True)
    stored = next(artifacts.rglob("a.txt"))
    stored.write_text(stored.read_text() + " and more")
    with pytest.raises(ArtifactIntegrityError, match=r"file a.txt has \d+ bytes, its manifest says \d+"):
        tracker.verify_stored(ref)
