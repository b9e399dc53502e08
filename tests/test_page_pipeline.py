"""The page-extraction DAG (`task: page_extraction`): its compiled IR stays in step, its tasks and their order, and the
run config's task choosing it for `doctune run`, `compile` and `submit`. The stages themselves are tested beside their
modules; no pipeline runs here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml
from kfp_api import KfpApi

from doctune.config import build_config, load_config
from doctune.config.pages import PAGE_TASK, Task
from doctune.summary import summarize
from doctune.tracking import Tracker
from doctune_kfp.pipelines import doctune_pipeline, local, page_extraction_pipeline
from doctune_kfp.pipelines.cli import main
from doctune_kfp.pipelines.dags import DAGS, dag_for
from doctune_kfp.pipelines.page_extraction_pipeline import IR_YAML, compile_pipeline
from doctune_kfp.pipelines.submit import pipeline_arguments

REPO = Path(__file__).resolve().parents[1]
PAGE_STAGES = ("pages", "page-sft", "page-merge", "page-quantize", "page-gate")


def test_compiled_ir_yaml_is_up_to_date(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == IR_YAML.read_text(), "pipelines/page_extraction_pipeline.yaml is stale: run `make compile` and commit it"


def test_ir_chains_the_page_stages_inside_an_exit_handler_and_branches_on_the_gate():
    ir, platform = yaml.safe_load_all(IR_YAML.read_text())
    assert ir["pipelineInfo"]["name"] == "doctune-page-extraction"
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {"config", "parent_run_id"}  # nothing to switch off
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["close-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = ir["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(inner) == {"open-run", *PAGE_STAGES, "condition-branches-2"}
    depends = {name: set(inner[name].get("dependentTasks", [])) - {"open-run"} for name in PAGE_STAGES}
    assert depends == {
        "pages": set(),
        "page-sft": {"pages"},
        "page-merge": {"page-sft", "pages"},
        "page-quantize": {"page-merge", "pages"},
        "page-gate": {"page-merge", "page-quantize", "pages"},
    }
    assert all("open-run" in inner[name]["dependentTasks"] for name in PAGE_STAGES)
    branches = ir["components"]["comp-condition-branches-2"]["dag"]["tasks"]
    assert branches["condition-3"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--page-gate-decision'] == 'promote'"
    )
    # Promote, or record the rejection; no deploy step in this DAG (the page model is served by a KServe example).
    assert set(ir["components"]["comp-condition-3"]["dag"]["tasks"]) == {"promote"}
    assert set(ir["components"]["comp-condition-4"]["dag"]["tasks"]) == {"record-rejection"}
    assert not any("deploy" in name for name in ir["deploymentSpec"]["executors"])
    # Caching off for what reads or moves registry state, on for the stages (their results are content-addressed).
    for name in ("open-run", "page-gate"):
        assert inner[name]["cachingOptions"] == {}, name
    for name in ("pages", "page-sft", "page-merge", "page-quantize"):
        assert inner[name]["cachingOptions"] == {"enableCache": True}, name
    # Training, merge, quantize and the gate (three VLMs extracting pages) go to the GPU pool in the CUDA image.
    executors, pods = ir["deploymentSpec"]["executors"], platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in PAGE_STAGES:
        on_gpu = stage != "pages"
        container = executors[f"exec-{stage}"]["container"]
        assert ("accelerator" in container["resources"]) == on_gpu and ("nodeSelector" in pods[f"exec-{stage}"]) == on_gpu
        assert container["image"].split("/")[-1].startswith("doctune-cuda:" if on_gpu else "doctune-cpu:"), stage


def test_every_task_of_the_run_config_has_a_dag():
    assert set(DAGS) == set(get_args(Task))
    assert {task: module.IR_YAML.name for task, module in DAGS.items()} == {
        "documents": "doctune_pipeline.yaml",
        PAGE_TASK: "page_extraction_pipeline.yaml",
    }


def test_doctune_run_runs_the_dag_of_the_configs_task(monkeypatch, tmp_path):
    profile = load_config(REPO / "configs" / "page-extraction.yaml", [f"project.workdir={tmp_path}"])
    assert profile.task == PAGE_TASK and profile.project.name == "doctune-pages"
    assert dag_for(profile) is page_extraction_pipeline and dag_for(load_config(None)) is doctune_pipeline
    built = []

    def build_pipeline(cluster):
        built.append(cluster)
        return lambda **arguments: built.append(arguments)

    monkeypatch.setattr(page_extraction_pipeline, "build_pipeline", build_pipeline)
    monkeypatch.setattr(doctune_pipeline, "build_pipeline", build_pipeline)
    monkeypatch.setattr(local, "init_local", lambda root: None)
    local._run_pipeline(profile, "parent-1")
    cluster, arguments = built
    assert cluster.retries == 0  # kfp.local: a failed task fails the run at once
    assert arguments == {"config": profile.to_yaml(), "parent_run_id": "parent-1"}  # no text-track switches
    documents = load_config(None, [f"project.workdir={tmp_path}", "cpt.enabled=false"])
    local._run_pipeline(documents, "parent-2")
    assert built[3] == {"config": documents.to_yaml(), "parent_run_id": "parent-2", "cpt_enabled": False,
                        "dpo_enabled": True, "retriever_enabled": True}  # fmt: skip


def test_compile_writes_every_tasks_ir_or_the_one_named(tmp_path, capsys):
    out = tmp_path / "pages.yaml"
    assert main(["compile", "--task", PAGE_TASK, "--output", str(out)]) == 0
    assert out.read_text() == IR_YAML.read_text()
    assert main(["compile", "--output", str(out)]) == 2
    assert "pass --task too" in capsys.readouterr().err


def test_submit_sends_the_page_dag_for_a_page_extraction_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "task": PAGE_TASK,
        "project": {"name": "doctune-pages"},
        "tracking": {"uri": "http://mlflow.doctune.svc:5000"},
        "ingest": {"pdfs": "/var/cache/doctune/corpus/scans"},
    }))  # fmt: skip
    with KfpApi() as api:
        assert main(["submit", "--host", api.url, "--config", str(path)]) == 0
        (request,) = api.sent("POST", "/runs")
    spec = request["body"]["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "doctune-page-extraction" and "exec-page-sft" in spec["deploymentSpec"]["executors"]
    params = request["body"]["runtime_config"]["parameters"]
    assert set(params) == {"config", "parent_run_id"} and yaml.safe_load(params["config"])["task"] == PAGE_TASK
    assert set(pipeline_arguments(build_config({}))) == {"config", "parent_run_id", "cpt_enabled", "dpo_enabled",
                                                         "retriever_enabled"}  # fmt: skip


@pytest.fixture
def page_run(tmp_path):
    """A finished page-extraction pipeline run in MLflow, as its stages record it (each stage run written here)."""
    config = build_config({"task": PAGE_TASK, "project": {"name": "doctune-pages", "workdir": str(tmp_path / "work")}})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("page-run")
    for stage in ("pages", "page_sft", "page_merge", "page_quantize", "page_gate"):
        run = tracker.start_stage_run(stage, parent, {})
        outputs = {}
        if stage == "page_sft":
            run.log_params({"page_sft.method": "lora"})
            for step, loss in ((1, 2.5), (2, 1.5)):
                run.log_metrics({"page_sft.loss": loss}, step=step)
            run.log_metrics({"page_sft.global_step": 2})
        if stage == "page_gate":
            report = tmp_path / "report"
            report.mkdir()
            decision = {"decision": "reject", "version": "1", "failed": ["min_json_validity"]}
            (report / "gate_report.json").write_text(json.dumps(decision))
            (report / "page_gate_report.md").write_text("# Page gate\n\n| model | accuracy |\n|---|---|\n| candidate | 0.125 |\n")
            outputs["report"] = run.log_output("report", report, "report")
        run.finish(outputs)
    tracker.close_pipeline_run(parent, succeeded=True)
    return tracker, parent


def test_the_console_summary_of_a_page_run_shows_what_the_page_stages_recorded(page_run):
    tracker, parent = page_run
    text = summarize(tracker, parent)
    assert all(stage in text for stage in ("pages", "page_sft", "page_merge", "page_quantize", "page_gate"))
    assert "2.500 → 1.500" in text  # the page_sft training row
    assert "page gate: REJECT candidate version 1" in text and "failed rules: min_json_validity" in text
    assert "| candidate | 0.125 |" in text  # the page gate's own report
    assert "gate report" in text and "experiment 'doctune-pages'" in text
