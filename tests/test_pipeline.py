"""The DAG: its compiled IR stays in step, and it runs end to end under kfp.local."""

from __future__ import annotations

import re

import yaml

from doctune.gate import registry
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main
from doctune_kfp.pipelines.doctune_pipeline import IR_YAML, compile_pipeline


def test_compiled_ir_yaml_is_up_to_date(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == IR_YAML.read_text(), "pipelines/doctune_pipeline.yaml is stale: run `make compile` and commit it"


def test_ir_declares_the_stages_and_an_exit_handler():
    spec = next(yaml.safe_load_all(IR_YAML.read_text()))  # the second document: kfp-kubernetes platform settings
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["close-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    # Branches in DAG order: retriever (2), CPT (5), DPO (8), the gate's decision (11).
    assert {"open-run", "ingest", "synth", "sft", "merge", "quantize", "eval-gate"} | {
        f"condition-branches-{n}" for n in (2, 5, 8, 11)
    } <= set(inner)
    assert "condition-branches-8" in inner["merge"]["dependentTasks"]  # merge takes DPO's model, or SFT's with DPO off
    assert {"merge", "synth"} <= set(inner["quantize"]["dependentTasks"])
    # The gate takes the retriever's comparison (or nothing with the retriever off) besides the models and the sets.
    assert {"merge", "quantize", "synth", "ingest", "condition-branches-2"} <= set(inner["eval-gate"]["dependentTasks"])
    gate = spec["components"]["comp-condition-branches-11"]["dag"]["tasks"]
    assert gate["condition-12"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--eval-gate-decision'] == 'promote'"
    )
    passed = spec["components"]["comp-condition-12"]["dag"]["tasks"]
    assert passed["promote"]["cachingOptions"] == {}
    # The InferenceService follows the registry: deploy runs after promote has moved the alias, never cached.
    assert passed["deploy"]["dependentTasks"] == ["promote"] and passed["deploy"]["cachingOptions"] == {}
    assert spec["components"]["comp-condition-13"]["dag"]["tasks"]["record-rejection"]["cachingOptions"] == {}
    for first, flag, stage in ((2, "retriever_enabled", "retriever"), (5, "cpt_enabled", "cpt")):
        branches = spec["components"][f"comp-condition-branches-{first}"]["dag"]["tasks"]
        condition = branches[f"condition-{first + 1}"]["triggerPolicy"]["condition"]
        assert condition == f"inputs.parameter_values['pipelinechannel--{flag}'] == true"
        assert stage in spec["components"][f"comp-condition-{first + 1}"]["dag"]["tasks"]
        assert any(t.startswith("skip-stage") for t in spec["components"][f"comp-condition-{first + 2}"]["dag"]["tasks"])
    assert inner["open-run"]["cachingOptions"] == {}  # caching off: every run gets its own parent run
    assert inner["ingest"]["cachingOptions"]["enableCache"] is True


def _run_args(config, pdfs, *overrides: str) -> list[str]:
    settings = [f"project.workdir={config.project.workdir}", f"model.base_model={config.model.base_model}",
                "cpt.max_steps=2", "cpt.block_size=64", "sft.max_steps=2", "sft.max_length=256", "dpo.max_steps=2",
                "dpo.max_length=256", *overrides]  # fmt: skip
    return ["run", "--pdfs", str(pdfs), *[arg for item in settings for arg in ("--set", item)]]


def _pipeline_runs(tracker):
    return tracker.client.search_runs([tracker.experiment_id], "tags.`doctune.kind` = 'pipeline'")


def test_local_pipeline_run_end_to_end(make_config, small_corpus, capsys):
    config = make_config(small_corpus)
    assert main(_run_args(config, small_corpus, "cpt.enabled=false", "dpo.enabled=false", "retriever.enabled=false")) == 0
    out = capsys.readouterr().out
    assert re.search(r"ingest +FINISHED", out) and "documents" in out and re.search(r"sft +FINISHED", out)
    tracker = Tracker(config)
    (parent,) = _pipeline_runs(tracker)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("doctune.kfp_run_id")
    # CPT switched off: the Else branch ran, and SFT trained on the base model.
    assert parent.data.tags["doctune.skipped.cpt"] == "true" and not tracker.stage_runs(parent.info.run_id, "cpt")
    assert parent.data.tags["doctune.skipped.dpo"] == "true" and not tracker.stage_runs(parent.info.run_id, "dpo")
    # The retriever off: the gate measured the base embedder against BM25 itself.
    assert parent.data.tags["doctune.skipped.retriever"] == "true" and not tracker.stage_runs(parent.info.run_id, "retriever")
    (gate,) = tracker.stage_runs(parent.info.run_id, "eval_gate")
    assert {"gate.retrieval.base.mrr_at_10", "gate.retrieval.bm25.recall_at_5"} <= set(gate.data.metrics)
    # A data scientist reruns SFT against this run: CPT was off there, so it starts from the base model again.
    rerun = ["stage", "sft", "--from-run", parent.info.run_id, *_run_args(config, small_corpus)[3:], "--set", "sft.max_steps=1"]
    assert main(rerun) == 0
    replaced, original = tracker.stage_runs(parent.info.run_id, "sft")
    assert replaced.data.tags["doctune.replaces"] == original.info.run_id
    # DPO was off too: the merged model is the SFT model's, and a merge rerun resolves the same input.
    (merge,) = tracker.stage_runs(parent.info.run_id, "merge")
    (original_sft,) = [r for r in tracker.stage_runs(parent.info.run_id, "sft") if "doctune.replaces" not in r.data.tags]
    assert merge.data.tags["doctune.upstream.model"] == tracker.outputs_of(original_sft)["model"].digest
    (quantize,) = tracker.stage_runs(parent.info.run_id, "quantize")
    assert {"gguf-q8_0", "nf4", "report"} <= set(tracker.outputs_of(quantize))
    assert re.search(r"merge +FINISHED", out) and "gguf-q8_0" in out and "ppl ratio" in out
    # The run ends with a gate decision: a random tiny model on two PDFs has too few items to tell anything
    # (insufficient evidence, recorded like a rejection) and answers no better than its random base; champion untouched.
    assert "gate: INSUFFICIENT-EVIDENCE candidate version 1" in out and "golden_f1_beats_base" in out
    assert parent.data.tags["doctune.gate.rejected"] == "1" and registry.champion(tracker) is None
    version = tracker.client.get_model_version(config.project.name, "1")
    assert "golden_f1_beats_base" in version.tags["doctune.rejected"]
    (stage,) = tracker.stage_runs(parent.info.run_id, "ingest")
    chunks = tracker.fetch(tracker.outputs_of(stage)["chunks"])
    assert (chunks / "chunks.parquet").is_file()


def test_local_pipeline_failure_closes_the_run_as_failed(make_config, tmp_path, capsys):
    (tmp_path / "only.pdf").write_bytes(b"")
    config = make_config(tmp_path)
    assert main(_run_args(config, tmp_path)) == 1
    err = capsys.readouterr().err
    assert "only.pdf" in err and "empty file (0 bytes)" in err
    (parent,) = _pipeline_runs(Tracker(config))
    assert parent.info.status == "FAILED"


def test_a_run_without_a_parent_id_opens_and_closes_its_own(make_config, small_corpus, tmp_path):
    """What a scheduled run on a cluster does: no submitter created the MLflow parent run."""
    from doctune_kfp.pipelines.doctune_pipeline import doctune_pipeline
    from doctune_kfp.pipelines.local import init_local

    config = make_config(small_corpus)
    init_local(tmp_path / "kfp")
    doctune_pipeline(config=config.to_yaml(), parent_run_id="")
    tracker = Tracker(config)
    (parent,) = _pipeline_runs(tracker)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"kfp-{parent.data.tags['doctune.kfp_run_id']}"
    assert tracker.stage_runs(parent.info.run_id, "ingest")
    (sft,) = tracker.stage_runs(parent.info.run_id, "sft")
    (cpt,) = tracker.stage_runs(parent.info.run_id, "cpt")
    (dpo,) = tracker.stage_runs(parent.info.run_id, "dpo")
    assert sft.data.tags["doctune.upstream.model"] == tracker.outputs_of(cpt)["model"].digest
    assert dpo.data.tags["doctune.upstream.model"] == tracker.outputs_of(sft)["model"].digest
