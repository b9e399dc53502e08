"""The shape the design contract fixes: layering (import-linter), packaging, per-stage code digests, typed KFP outputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from doctune import code_digest as code_digest_module
from doctune.stages import STAGES, execute_stage
from doctune.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "doctune"


def test_import_linter_contracts_are_kept():
    """Stages never import each other; doctune never imports kfp or the KFP side; shared modules never import a
    stage; the training engine has no cycle. (`make lint` runs the same contracts.)"""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_stage_module_names_another_stage_in_its_source():
    """The contract seen in the files themselves: no `doctune.<other stage>` in a stage package's source."""
    stages = {"ingest", "synth", "retriever", "cpt", "sft", "dpo", "merge", "quantize", "gate"}
    offenders = []
    for stage in stages:
        for path in (SRC / stage).rglob("*.py"):
            text = path.read_text()
            offenders += [f"{path.relative_to(SRC)} -> {other}" for other in stages - {stage} if f"doctune.{other}" in text]
    assert offenders == []


def test_the_kfp_side_is_not_installed_as_top_level_components_or_pipelines(tmp_path):
    """`components` and `pipelines` would clash with any other package of those names: outside the repository they
    do not import; the KFP side is `doctune_kfp`."""
    for name in ("components", "pipelines"):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode != 0 and "No module named" in done.stderr, name
    done = subprocess.run(
        [sys.executable, "-c", "import doctune_kfp.components.sft.component, doctune_kfp.pipelines.cli"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py")}
    for top in ("components", "pipelines"):
        found |= {
            "doctune_kfp." + ".".join(p.parent.relative_to(REPO).parts)
            for p in (REPO / top).rglob("__init__.py")
            if "tests" not in p.parts
        }
    assert found == listed


def test_a_stage_code_digest_covers_the_modules_it_uses_and_nothing_else(tmp_path):
    """Editing the CLI summary, the README or another stage leaves a stage's digest; editing what it imports moves it."""
    copy = tmp_path / "doctune"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = {name: code_digest_module.code_digest(spec.module, copy) for name, spec in STAGES.items()}
    (copy / "summary.py").write_text((copy / "summary.py").read_text() + "\n# an edit no stage uses\n")
    (copy / "quantize" / "stage.py").write_text((copy / "quantize" / "stage.py").read_text() + "\n# quantize only\n")
    code_digest_module._digest.cache_clear()
    after = {name: code_digest_module.code_digest(spec.module, copy) for name, spec in STAGES.items()}
    assert {name for name in STAGES if after[name] != before[name]} == {"quantize"}
    (copy / "chat.py").write_text((copy / "chat.py").read_text() + "\n# chat is shared\n")
    code_digest_module._digest.cache_clear()
    shared = {name: code_digest_module.code_digest(spec.module, copy) for name, spec in STAGES.items()}
    assert {name for name in STAGES if shared[name] != after[name]} >= {"synth", "sft", "dpo", "merge", "eval_gate"}
    code_digest_module._digest.cache_clear()


def test_an_edit_no_stage_uses_leaves_an_earlier_stage_result_reusable(make_config, small_corpus, tmp_path, monkeypatch):
    """The runner's reuse follows the per-stage digest: after an edit of a file the stage does not import, the same
    stage with the same config and inputs is reused, not run again."""
    copy = tmp_path / "doctune"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    code_digest_module._digest.cache_clear()
    original = code_digest_module.code_digest
    monkeypatch.setattr("doctune.stages.code_digest", lambda module: original(module, copy))
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("reuse-test")
    first = execute_stage("ingest", config, tracker, parent, {})
    (copy / "summary.py").write_text((copy / "summary.py").read_text() + "\n# an edit ingest does not use\n")
    code_digest_module._digest.cache_clear()
    second = execute_stage("ingest", config, tracker, parent, {})
    assert second.reused_from == first.run_id
    (copy / "ingest" / "chunking.py").write_text((copy / "ingest" / "chunking.py").read_text() + "\n# an ingest edit\n")
    code_digest_module._digest.cache_clear()
    third = execute_stage("ingest", config, tracker, parent, {})
    assert third.reused_from is None
    code_digest_module._digest.cache_clear()


def test_the_compiled_ir_declares_typed_artifact_outputs_for_every_stage():
    """Kubeflow sees datasets, models, metrics and the gate's HTML report, not only JSON strings."""
    components = {}
    for dag in ("doctune_pipeline.yaml", "page_extraction_pipeline.yaml"):  # each stage is in one of the two DAGs
        components |= next(yaml.safe_load_all((REPO / "pipelines" / dag).read_text()))["components"]  # then platform specs
    for name, spec in STAGES.items():
        component = components[f"comp-{name.replace('_', '-')}"]
        artifacts = component["outputDefinitions"]["artifacts"]
        declared = {key: value["artifactType"]["schemaTitle"] for key, value in artifacts.items()}
        expected = {
            key: {"dataset": "system.Dataset", "model": "system.Model", "metrics": "system.Metrics", "html": "system.HTML",
                  "markdown": "system.Markdown"}[kind]
            for key, (_, kind) in spec.kfp_outputs.items()
        }  # fmt: skip
        assert declared == expected, name
    assert components["comp-eval-gate"]["outputDefinitions"]["artifacts"]["gate_report"]["artifactType"]["schemaTitle"] == (
        "system.HTML"
    )
    # Inputs are named by what the consumer takes, not by the producer.
    assert set(components["comp-sft"]["inputDefinitions"]["parameters"]) >= {"datasets", "model"}
    assert set(components["comp-eval-gate"]["inputDefinitions"]["parameters"]) >= {"model", "quantized", "datasets"}
