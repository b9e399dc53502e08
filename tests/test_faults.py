"""Fault injection against the real CLI: what the user sees (exit code, one line naming the cause) and that nothing
is lost (good results kept, registry aliases unchanged, no run left RUNNING, no orphaned process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from doctune.gate import registry
from doctune.stages import execute_stage
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main

pytestmark = pytest.mark.faults
DOCTUNE = str(Path(sys.executable).with_name("doctune"))


def write_config(config, path: Path) -> Path:
    path.write_text(config.to_yaml())
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def store_file(tracker: Tracker, ref, name: str) -> Path:
    uri = tracker.client.get_run(ref.run_id).info.artifact_uri
    return Path(uri.removeprefix("file://")) / ref.artifact_path / name


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    path.write_bytes(bytes(data))


# -- artifacts verified on every use ---------------------------------------------------------


@pytest.fixture
def merged_run(make_config, small_corpus, tmp_path):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("faults")
    ingested = execute_stage("ingest", config, tracker, parent, {})
    data = execute_stage("synth", config, tracker, parent, {k: ingested.outputs[k] for k in ("chunks", "pages")}).outputs
    sft = execute_stage("sft", config, tracker, parent, {"sft": data["sft"]})
    merged = execute_stage("merge", config, tracker, parent, {"model": sft.outputs["model"]})
    tracker.client.set_tag(parent, "doctune.skipped.dpo", "true")  # as a pipeline run with DPO off records it
    tracker.close_pipeline_run(parent, succeeded=True)
    return config, tracker, parent, merged.outputs["model"], write_config(config, tmp_path / "run.yaml")


def test_a_model_tampered_in_the_store_is_not_handed_on_by_a_reused_stage(merged_run, capsys):
    _, tracker, parent, model, config_file = merged_run
    weights = store_file(tracker, model, "model.safetensors")
    assert tracker.fetch(model)  # the local cache holds an intact copy: the store is what must be checked
    flip_bytes(weights)  # same size, other bytes
    code = main(["stage", "merge", "--from-run", parent, "--config", str(config_file)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "model.safetensors" in line and "tampered or corrupted" in line, line
    (failed,) = [r for r in tracker.client.search_runs([tracker.experiment_id]) if r.info.status == "FAILED"]
    assert failed.data.tags["doctune.stage"] == "merge" and "model.safetensors" in failed.data.tags["doctune.error"]


def test_registry_refuses_to_register_or_promote_tampered_weights(merged_run, capsys):
    _, tracker, _, model, config_file = merged_run
    version = registry.register_candidate(tracker, model, {}, {})
    flip_bytes(store_file(tracker, model, "model.safetensors"))
    assert main(["promote", version, "--config", str(config_file)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.safetensors" in line and "tampered or corrupted" in line
    assert registry.champion(tracker) is None  # the alias did not move
    with pytest.raises(Exception, match="model.safetensors"):
        registry.register_candidate(tracker, model, {}, {})


def test_rollback_on_an_empty_store_is_one_line(tmp_path, capsys):
    assert main(["rollback", "--set", f"project.workdir={tmp_path / 'work'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no registered model 'doctune'" in line and "nothing to roll back" in line


# -- infrastructure in one line --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_tracking_server_that_refuses_fails_at_once_naming_the_uri(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["stage", "ingest", "--tracking-uri", uri, "--set", f"project.workdir={tmp_path / 'work'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert uri in line and "does not answer" in line and time.monotonic() - started < 15


def test_a_tracking_server_that_never_answers_times_out_in_about_ten_seconds(tmp_path, capsys):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert main(["stage", "ingest", "--tracking-uri", uri, "--set", f"project.workdir={tmp_path / 'work'}"]) == 2
        elapsed = time.monotonic() - started
    line = one_error_line(capsys.readouterr().err)
    assert uri in line and "timed out" in line and elapsed < 20


def test_a_work_directory_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    assert main(["stage", "ingest", "--set", f"project.workdir={blocker / 'work'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(blocker) in line and "is a file" in line


def test_a_read_only_work_directory_is_one_line(make_config, small_corpus, tmp_path, as_a_user):
    config_file = write_config(make_config(small_corpus), tmp_path / "run.yaml")
    workdir = tmp_path / "readonly"
    workdir.mkdir()
    workdir.chmod(0o555)
    command = [DOCTUNE, "stage", "ingest", "--config", str(config_file), "--set", f"project.workdir={workdir}"]
    done = subprocess.run(command, **as_a_user(tmp_path / "home"))
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and str(workdir) in line and "not writable" in line, done.stderr


def test_two_first_runs_on_a_fresh_work_directory_both_succeed(make_config, small_corpus, tmp_path):
    """The sqlite store's tables are created once, under a lock, not twice at the same time."""
    config_file = write_config(make_config(small_corpus), tmp_path / "run.yaml")
    command = [DOCTUNE, "stage", "ingest", "--config", str(config_file)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 and "Traceback" not in err, err[-3000:]


# -- interruptions ---------------------------------------------------------------------------


def start_run(config_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [DOCTUNE, "run", "--config", str(config_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for_running_stage(tracker: Tracker, process: subprocess.Popen, timeout: float = 300) -> list[psutil.Process]:
    """Once a stage run is RUNNING and its component process has started, the leader's descendants."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        runs = tracker.client.search_runs([tracker.experiment_id], filter_string="attributes.status = 'RUNNING'")
        if any(r.data.tags.get("doctune.kind") == "stage" for r in runs):
            return psutil.Process(process.pid).children(recursive=True)
        time.sleep(0.5)
    raise AssertionError("no stage started")


def assert_nothing_left(tracker: Tracker, descendants: list[psutil.Process], workdir: Path) -> None:
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.cmdline()[:4] for p in alive]
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert not list((workdir / "tmp").glob("*/*")), "the components' temporary folders are removed"


@pytest.mark.parametrize(("how", "signum", "code"), [("leader", signal.SIGTERM, 143), ("group", signal.SIGINT, 130)])
def test_an_interrupted_run_ends_its_components_and_closes_every_run(make_config, small_corpus, tmp_path, how, signum, code):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    process = start_run(write_config(config, tmp_path / "run.yaml"))
    descendants = wait_for_running_stage(tracker, process)
    if how == "leader":
        os.kill(process.pid, signum)  # a service manager stopping doctune: the components get nothing from it
    else:
        os.killpg(process.pid, signum)  # Ctrl-C in a terminal: the whole foreground group
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    line = one_error_line(err)
    assert line.startswith(f"interrupted ({signal.Signals(signum).name}): pipeline run ") and "closed as KILLED" in line
    assert "run the same command again to resume" in line
    assert_nothing_left(tracker, descendants, config.project.workdir)
    pipeline = [r for r in tracker.client.search_runs([tracker.experiment_id]) if r.data.tags.get("doctune.kind") == "pipeline"]
    assert [r.info.status for r in pipeline] == ["KILLED"]


def test_a_killed_run_leaves_no_orphan_and_its_runs_are_closed_at_the_next_start(make_config, small_corpus, tmp_path):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    config_file = write_config(config, tmp_path / "run.yaml")
    process = start_run(config_file)
    descendants = wait_for_running_stage(tracker, process)
    os.kill(process.pid, signal.SIGKILL)  # no handler runs: the components must notice on their own
    process.wait(timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive, [p.cmdline()[:4] for p in alive]
    left = [r for r in tracker.client.search_runs([tracker.experiment_id]) if r.info.status == "RUNNING"]
    assert left  # the leader could not close its pipeline run
    done = subprocess.run([DOCTUNE, "stage", "ingest", "--config", str(config_file)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in left:
        closed = tracker.client.get_run(run.info.run_id)
        assert closed.info.status == "KILLED" and "abandoned" in closed.data.tags["doctune.error"]
