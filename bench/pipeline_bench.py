"""Orchestration overhead of the local pipeline: wall time of a whole `kfp.local` run minus the stages' own time,
as a share of the wall time (target < 10%), measured on the tiny profile in a fresh workdir (nothing reused).

A stage's own time is its MLflow stage run, from start to finish (the work plus logging its outputs); the rest is
kfp.local (a process per component, importing doctune), the bookkeeping components and the parent run.
The latest full run of the cpu-demo profile (`make run`) under .doctune, when there is one, is reported the same way.
Writes bench/results/pipeline.json and pipeline.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from results_io import write_results

from doctune.config import load_config
from doctune.tracking import TAG, Tracker

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.10


def overhead(tracker: Tracker, parent_run_id: str, wall: float | None = None) -> dict:
    """Stage seconds of a pipeline run against its wall time (default: the parent run's own duration)."""
    parent = tracker.client.get_run(parent_run_id)
    wall = wall if wall is not None else (parent.info.end_time - parent.info.start_time) / 1000
    stages = {}
    for run in tracker.stage_runs(parent_run_id):
        name = run.data.tags.get(f"{TAG}stage", "?")
        stages[name] = stages.get(name, 0.0) + (run.info.end_time - run.info.start_time) / 1000
    own = sum(stages.values())
    return {"pipeline_run": parent_run_id, "wall_seconds": round(wall, 1), "stage_seconds": round(own, 1),
            "stages": {k: round(v, 1) for k, v in stages.items()}, "overhead_seconds": round(wall - own, 1),
            "overhead_share": round((wall - own) / wall, 3)}  # fmt: skip


def latest_full_run(workdir: Path) -> dict | None:
    config = load_config(REPO / "configs" / "cpu-demo.yaml", [f"project.workdir={workdir}"])
    if not (workdir / "mlflow.db").is_file():
        return None
    tracker = Tracker(config)
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{TAG}kind` = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=20,
    )  # fmt: skip
    for run in runs:  # the latest run that did the work (not one that reused every stage)
        stage_runs = tracker.stage_runs(run.info.run_id)
        if len(stage_runs) >= 8 and not any(f"{TAG}reused_from" in r.data.tags for r in stage_runs):
            return overhead(tracker, run.info.run_id)
    return None


def main() -> None:
    from doctune_kfp.pipelines.local import run_local

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, default=REPO / ".doctune")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="doctune-pipeline-bench-") as tmp:
        config = load_config(REPO / "configs" / "tiny.yaml", [f"project.workdir={tmp}"])
        started = time.monotonic()
        parent = run_local(config, run_name="bench-pipeline")
        tiny = overhead(Tracker(config), parent, wall=time.monotonic() - started)
    result = {"tiny": tiny, "default_last_run": latest_full_run(args.workdir), "target_overhead_share": TARGET}
    lines = ["| pipeline run | wall s | stages s | overhead s | overhead share | target |", "|---|---|---|---|---|---|"]
    for name, row in (("tiny profile (fresh)", tiny), ("default profile (last full run)", result["default_last_run"])):
        if row:
            lines.append(f"| {name} | {row['wall_seconds']} | {row['stage_seconds']} | {row['overhead_seconds']} | "
                         f"{row['overhead_share']:.1%} | < {TARGET:.0%} |")  # fmt: skip
    write_results(args.out, "pipeline", result, lines)


if __name__ == "__main__":
    main()
