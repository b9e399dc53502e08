"""Run the run config's DAG (its `task`) on this machine with kfp.local: every component in a subprocess of this Python."""

import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from kfp import local

from doctune.config import RunConfig
from doctune.processes import end_children, owner_of_children, stop_on_signals, stopped_by
from doctune.redact import redact
from doctune.tracking import TAG, Tracker
from doctune_kfp.pipelines.dags import dag_for


class LocalRunError(RuntimeError):
    def __init__(self, parent_run_id: str, message: str):
        super().__init__(message)
        self.parent_run_id = parent_run_id


def init_local(pipeline_root: Path) -> None:
    """Make kfp.local run components as subprocesses of this Python environment."""
    # Components run `python3 -m kfp.dsl.executor_main`: make that this environment's python.
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # Running components in this environment instead of their images is the point of a local run.
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        workspace_root=str(Path(pipeline_root) / "workspace"),
    )


class StageProgress(threading.Thread):
    """One line per stage as it starts and as it ends, read from the MLflow runs the stages open."""

    def __init__(self, tracker: Tracker, parent_run_id: str, emit: Callable[[str], None], interval: float = 2.0):
        super().__init__(daemon=True)
        self.tracker, self.parent, self.emit, self.interval = tracker, parent_run_id, emit, interval
        self.started = time.monotonic()
        self.done = threading.Event()
        self.seen: dict[str, str] = {}  # run id -> last status shown

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.poll()
        self.poll()

    def poll(self) -> None:
        try:
            runs = self.tracker.client.search_runs(
                [self.tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent}'",
                order_by=["attributes.start_time ASC"],
            )  # fmt: skip
        except Exception:  # a busy sqlite store: try again at the next tick
            return
        for run in runs:
            status, tags = run.info.status, run.data.tags
            if self.seen.get(run.info.run_id) == status or tags.get(f"{TAG}kind") != "stage":
                continue
            self.seen[run.info.run_id] = status
            stage, clock = tags.get(f"{TAG}stage", "?"), f"[{time.monotonic() - self.started:6.0f}s]"
            if status == "RUNNING":
                self.emit(f"{clock} {stage:<10} running")
            elif status == "FINISHED":
                seconds = (run.info.end_time - run.info.start_time) / 1000
                note = " (reused an earlier identical result)" if f"{TAG}reused_from" in tags else ""
                self.emit(f"{clock} {stage:<10} done in {seconds:.1f}s{note}")
            else:
                self.emit(f"{clock} {stage:<10} {status.lower()}: {redact(tags.get(f'{TAG}error', ''))[:300]}")


@contextmanager
def children_temp_dir(folder: Path):
    """Components (and kfp's own wrapper, which `mktemp -d`s each component's source) make their temporary folders
    in `folder`, removed afterwards whatever happened: a killed component leaves nothing under the system temp."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    try:
        yield folder
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def output_to(log_path: Path):
    """Send this process's and its children's stdout/stderr to `log_path`; yields a writer to the real stdout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with open(log_path, "ab") as log, open(log_path, "a", buffering=1) as text:
        os.dup2(log.fileno(), 1)  # child processes (the components)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = text  # Python-level writers that are not fd 1/2 (e.g. under pytest's capture)
        try:
            yield lambda line: os.write(saved_fds[0], (line + "\n").encode())
        finally:
            text.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            os.close(saved_fds[0])
            os.close(saved_fds[1])


def run_local(config: RunConfig, run_name: str = "local", log_path: Path | None = None) -> str:
    """Run the pipeline locally; returns the MLflow parent run id, or raises LocalRunError naming it.

    With `log_path`, kfp.local's and the components' output goes there and the console shows one line per stage.
    """
    tracker = Tracker(config)
    tracker.close_abandoned_runs()
    parent = tracker.open_pipeline_run(run_name=run_name)
    with children_temp_dir(config.project.workdir / "tmp" / parent):
        try:
            with stop_on_signals(end_children_first=True), owner_of_children():
                _run_with_progress(config, tracker, parent, log_path)
        except BaseException as exc:
            if stopped_by(exc):
                close_interrupted(tracker, parent, exc)
            raise
    return parent


def _run_with_progress(config: RunConfig, tracker: Tracker, parent: str, log_path: Path | None) -> None:
    if log_path is None:
        _run_pipeline(config, parent)
        return
    with output_to(log_path) as emit:
        emit(f"pipeline run {parent}: components log to {log_path}")
        progress = StageProgress(tracker, parent, emit)
        progress.start()
        try:
            _run_pipeline(config, parent)
        finally:
            progress.done.set()
            progress.join()


def close_interrupted(tracker: Tracker, parent: str, exc: BaseException) -> None:
    """After SIGINT/SIGTERM: the components are ended (they close their own stage runs as KILLED), whatever is still
    RUNNING under the pipeline run is closed as KILLED, and the pipeline run itself, with the reason."""
    end_children()
    reason = f"{getattr(exc, 'signal_name', 'SIGINT')}: the run was interrupted"
    running = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'"
    )
    for run in running:
        tracker.end_run(run.info.run_id, "KILLED", reason)
    tracker.end_run(parent, "KILLED", reason)
    exc.parent_run_id = parent


def _run_pipeline(config: RunConfig, parent: str) -> None:
    init_local(config.project.workdir / "kfp")
    dag = dag_for(config)
    # kfp.local honours retry policies: here a failed task fails the run at once (retries are for lost cluster nodes).
    pipeline = dag.build_pipeline(config.cluster.model_copy(update={"retries": 0}))
    try:
        pipeline(config=config.to_yaml(), parent_run_id=parent, **dag.arguments(config))
    except RuntimeError as exc:  # kfp.local reports a failed task this way; the exit handler closed the run
        raise LocalRunError(parent, str(exc)) from exc
