"""`make run PROFILE=tiny` end to end: the whole DAG on the shared corpus with the random tiny model, the registry
and report it leaves, a rerun that reuses every stage, and an SFT change that re-executes only SFT onwards."""

from __future__ import annotations

import json
import re
from pathlib import Path

from doctune.config import load_config
from doctune.gate import registry
from doctune.gate.stage import REPORT_FILE
from doctune.tracking import TAG, Tracker
from doctune_kfp.pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "synth", "retriever", "cpt", "sft", "dpo", "merge", "quantize", "eval_gate"]


def pipeline_runs(tracker: Tracker) -> list:
    return tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{TAG}kind` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )


def reused(tracker: Tracker, parent_run_id: str) -> dict[str, bool]:
    return {r.data.tags[f"{TAG}stage"]: f"{TAG}reused_from" in r.data.tags for r in tracker.stage_runs(parent_run_id)}


def test_tiny_profile_end_to_end_then_reuse_then_an_sft_change(tmp_path, corpus, capfd):
    args = ["run", "--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"project.workdir={tmp_path / 'work'}",
            "--pdfs", str(corpus)]  # fmt: skip
    assert main(args) == 0, capfd.readouterr().err
    out = capfd.readouterr().out
    config = load_config(REPO / "configs" / "tiny.yaml", [f"project.workdir={tmp_path / 'work'}"])
    tracker = Tracker(config)
    (first,) = pipeline_runs(tracker)
    assert first.info.status == "FINISHED"
    assert sorted(reused(tracker, first.info.run_id)) == sorted(STAGES)
    # Registry: the first candidate passed the tiny profile's bars and is the champion (and the challenger).
    assert registry.champion(tracker)[0] == "1"
    version = tracker.client.get_model_version(config.project.name, "1")
    assert {"champion", "challenger"} <= set(version.aliases)
    # The gate report: the decision, every model scored, the metrics table in the summary.
    (gate_run,) = tracker.stage_runs(first.info.run_id, "eval_gate")
    report_dir = tracker.fetch(tracker.outputs_of(gate_run)["report"])
    report = json.loads((report_dir / REPORT_FILE).read_text())
    assert report["decision"] == "promote" and report["failed"] == []
    assert {"candidate", "base"} <= set(report["models"]) and "golden_f1" in report["models"]["candidate"]["metrics"]
    assert any(p.suffix in (".md", ".html") for p in report_dir.iterdir())
    # The retriever stage's comparison is the report's retrieval table: base, tuned, BM25 and hybrid.
    assert report["retrieval"]["source"] == "retriever stage"
    assert list(report["retrieval"]["metrics"]) == ["base", "tuned", "bm25", "hybrid"]
    assert "gate: PROMOTE candidate version 1" in out and "mlflow ui --backend-store-uri" in out
    for stage in STAGES:
        assert re.search(rf"{stage} +FINISHED +[0-9.]+s", out), stage
        assert re.search(rf"\] {stage} +running\n.*\] {stage} +done in [0-9.]+s\n", out, re.S), stage  # progress
    # The components' own output went to a log file, named at the end.
    log = Path(re.search(r"component logs: (\S+)", out).group(1))
    assert "Executing task" in log.read_text() and "Executing task" not in out

    # The same run again: every stage reuses its earlier result, the gate's too (this model serves already).
    assert main(args) == 0
    out = capfd.readouterr().out
    second = pipeline_runs(tracker)[-1]
    assert reused(tracker, second.info.run_id) == dict.fromkeys(STAGES, True)
    for stage in STAGES:
        assert re.search(rf"\] {stage} +done in [0-9.]+s \(reused an earlier identical result\)", out), stage
    assert registry.champion(tracker)[0] == "1" and len(tracker.client.search_model_versions()) == 1

    # One SFT hyperparameter changed: SFT and everything after it run again, what comes before is reused.
    assert main([*args, "--set", "sft.learning_rate=0.0005"]) == 0
    third = pipeline_runs(tracker)[-1]
    assert reused(tracker, third.info.run_id) == {stage: stage in ("ingest", "synth", "retriever", "cpt") for stage in STAGES}
    judged_against = tracker.client.get_model_version(config.project.name, "2").tags["doctune.gated_against"]
    assert judged_against == json.loads(version.tags["doctune.model_ref"])["digest"]  # version 1, the champion
