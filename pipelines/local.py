"""Run the DAG on this machine with kfp.local: every component in a subprocess of this Python."""

import os
import sys
import warnings
from pathlib import Path

from kfp import local

from doctune.config import RunConfig
from doctune.tracking import Tracker
from pipelines.doctune_pipeline import build_pipeline


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
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))


def run_local(config: RunConfig, run_name: str = "local") -> str:
    """Run the pipeline locally; returns the MLflow parent run id, or raises LocalRunError naming it."""
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run(run_name=run_name)
    init_local(config.project.workdir / "kfp")
    # kfp.local honours retry policies: here a failed task fails the run at once (retries are for lost cluster nodes).
    pipeline = build_pipeline(config.cluster.model_copy(update={"retries": 0}))
    try:
        pipeline(
            config=config.to_yaml(), parent_run_id=parent, cpt_enabled=config.cpt.enabled, dpo_enabled=config.dpo.enabled
        )
    except RuntimeError as exc:  # kfp.local reports a failed task this way; the exit handler closed the run
        raise LocalRunError(parent, str(exc)) from exc
    return parent
