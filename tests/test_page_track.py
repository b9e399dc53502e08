"""The page-extraction track on real rendered pages and the tiny random SmolVLM-architecture model: SFT, merge checked
by logits on page images, NF4 checked against the merged model, the gate's strict-JSON scores and the registry, and a
preempted page SFT resuming from its checkpoint."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from doctune.config import build_config
from doctune.gate import registry
from doctune.stages import execute_stage
from doctune.tracking import Tracker

DOCUMENTS = ("camlidl-1.04.doc.pdf", "sample-plain.pdf", "automultiplechoice.pdf")


def page_config(workdir, pdfs, **overrides):
    data = {
        "task": "page_extraction",
        "project": {"workdir": str(workdir), "name": "pages-test"},
        "model": {"base_model": "bundled:tiny-random-vlm"},
        "pages": {"pdfs": str(pdfs), "max_pages_per_document": 3, "render": {"dpi": 40}},
        "page_sft": {"max_steps": 2, "gradient_accumulation_steps": 1, "max_length": 1024, "max_output_tokens": 256,
                     "logging_steps": 1, "save_steps": 2},
        "page_quantize": {"variants": ["nf4", "gguf-q8_0"], "check_pages": 1},
        "page_gate": {"max_pages": 2, "permutations": 200},
    }  # fmt: skip
    return build_config(data, [f"{key}={value}" for key, value in overrides.items()])


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("page-pdfs")
    for name in DOCUMENTS:
        (folder / name).write_bytes((corpus / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def pages(tmp_path_factory, pdfs, tiny_vlm_dir):
    """The pages stage's dataset in a fresh work directory: (config, tracker, pipeline run, pages result)."""
    config = page_config(tmp_path_factory.mktemp("page-track"), pdfs)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("page-track")
    return config, tracker, parent, execute_stage("pages", config, tracker, parent, {})


def test_sft_merge_quantize_and_gate_register_a_scored_page_model(pages, tmp_path):
    config, tracker, parent, rendered = pages
    dataset = rendered.outputs["dataset"]
    tuned = execute_stage("page_sft", config, tracker, parent, {"pages": dataset})
    adapter = tracker.fetch(tuned.outputs["model"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "schema.json").is_file()
    local = tracker.client.download_artifacts(tuned.run_id, "page_sft_data_report.json", str(tmp_path))
    data_report = json.loads(Path(local).read_text())
    assert data_report["train_pages"] > 0 and data_report["median_length"] <= config.page_sft.max_length

    merged = execute_stage("page_merge", config, tracker, parent, {"model": tuned.outputs["model"], "pages": dataset})
    meta = json.loads((tracker.fetch(merged.outputs["model"]) / "doctune_model.json").read_text())
    check = meta["merge_check"]
    assert check["adapter"] and check["probe_pages"] >= 1 and check["max_logit_diff"] <= check["tolerance"] == 1e-3

    quantized = execute_stage("page_quantize", config, tracker, parent, {"model": merged.outputs["model"], "pages": dataset})
    report = json.loads((tracker.fetch(quantized.outputs["report"]) / "quantize_report.json").read_text())
    assert set(report["variants"]) == {"nf4"} and "nf4" in quantized.outputs
    nf4 = report["variants"]["nf4"]
    assert 0 <= nf4["same_reply_share"] <= 1 and len(nf4["replies"]) == len(report["pages"]) == 1
    assert "mmproj" in report["failed"]["gguf-q8_0"]

    inputs = {"model": merged.outputs["model"], "quantized": quantized.outputs["report"], "pages": dataset}
    gated = execute_stage("page_gate", config, tracker, parent, inputs)
    folder = tracker.fetch(gated.outputs["report"])
    result = json.loads((folder / "gate_report.json").read_text())
    # A random model writes no valid JSON: the validity rule rejects it, and the scores say why.
    assert result["decision"] == "reject" and "json_validity" in result["failed"] and result["reference"] == "base"
    candidate = result["summaries"]["candidate"]
    assert candidate["n"] == 2 and candidate["json_validity"]["mean"] == 0.0
    assert candidate["latency_ms"]["p95"] > 0 and set(candidate["per_key"]) >= {"title", "page_number"}
    assert all(page["retried"] for page in result["pages"]["candidate"])  # retry_invalid: one more try, no repair
    test_ids = {json.loads(line)["id"] for line in (tracker.fetch(dataset) / "test.jsonl").read_text().splitlines()}
    assert {page["id"] for page in result["pages"]["candidate"]} <= test_ids
    assert "JSON validity" in (folder / "page_gate_report.md").read_text()
    version = tracker.client.get_model_version_by_alias("pages-test", registry.CHALLENGER)
    assert str(version.version) == result["version"] and version.tags["doctune.gate_decision"] == "reject"
    assert json.loads(version.tags[registry.VARIANTS_TAG]).keys() == {"nf4"}

    # Promoted by hand, the page champion is never read as the documents track's: the error names the fix.
    registry.promote(tracker, result["version"], "test")
    assert registry.champion(tracker)[0] == result["version"]
    with pytest.raises(registry.RegistryError, match=r"is a page_extraction model.*project.name"):
        registry.champion(Tracker(config.model_copy(update={"task": "documents"})))


def _killed_after_first_checkpoint(config_yaml: str, parent: str, inputs_json: str) -> None:
    """Child process: page SFT that dies hard (no cleanup) right after its first checkpoint is written."""
    from transformers import TrainerCallback

    from doctune.artifacts import refs_from_json
    from doctune.config import config_from_yaml
    from doctune.train import launch

    class Preempt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            os._exit(137)

    original = launch.run_job
    launch.run_job = lambda job, callbacks=None: original(job, [Preempt()])
    config = config_from_yaml(config_yaml)
    execute_stage("page_sft", config, Tracker(config), parent, refs_from_json(inputs_json))


def test_a_preempted_page_sft_resumes_from_its_checkpoint(pages):
    from doctune.artifacts import refs_to_json

    base, tracker, parent, rendered = pages
    config = base.model_copy(update={"page_sft": base.page_sft.model_copy(update={"max_steps": 4, "save_steps": 2})})
    inputs = {"pages": rendered.outputs["dataset"]}
    child = multiprocessing.get_context("spawn").Process(
        target=_killed_after_first_checkpoint, args=(config.to_yaml(), parent, refs_to_json(inputs))
    )
    child.start()
    child.join(300)
    assert child.exitcode == 137
    resumed = execute_stage("page_sft", config, tracker, parent, inputs)
    metrics = tracker.client.get_run(resumed.run_id).data.metrics
    assert metrics["page_sft.resumed_from_step"] == 2 and metrics["page_sft.global_step"] == 4


def test_test_pages_a_model_could_only_answer_cut_off_are_left_out_and_listed(tiny_vlm_dir, tmp_path):
    from PIL import Image

    from doctune.gate.page_stage import answerable
    from doctune.page_schema import SELF_SUPERVISED_SCHEMA

    Image.new("RGB", (300, 400), "white").save(tmp_path / "page.png")
    pages = [{"id": "short", "image": "page.png", "fields": {"title": "Installation"}},
             {"id": "long", "image": "page.png", "fields": {"title": "word " * 400}}]  # fmt: skip
    kept, skipped = answerable(pages, tmp_path, SELF_SUPERVISED_SCHEMA, "Extract.", tiny_vlm_dir, max_new=64)
    assert [page["id"] for page in kept] == ["short"]
    assert [item["id"] for item in skipped] == ["long"] and "> page_sft.max_output_tokens" in skipped[0]["reason"]
