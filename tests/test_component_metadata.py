"""Every component folder's metadata.yaml and README.md against the component itself: names, KFP input and output
types, the stage and its config sections, image, default resources and pinned KFP versions."""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from doctune import __version__
from doctune.config import ClusterConfig
from doctune.stages import STAGES

COMPONENTS = Path(__file__).resolve().parents[1] / "components"
FOLDERS = sorted(path.parent.name for path in COMPONENTS.glob("*/component.py"))
FACTORY = "rerun_stage"  # rerun_stage_component(stage) builds it; checked as built for ingest
KFP_KIND = {
    "dataset": "system.Dataset@0.0.1",
    "model": "system.Model@0.0.1",
    "metrics": "system.Metrics@0.0.1",
    "html": "system.HTML@0.0.1",
    "markdown": "system.Markdown@0.0.1",
}
REQUIRED = {"name", "description", "stage", "image", "resources", "inputs", "outputs", "owners", "stability", "dependencies"}


@cache
def metadata(name: str) -> dict:
    return yaml.safe_load((COMPONENTS / name / "metadata.yaml").read_text())


def component(name: str, stage: str = "ingest"):
    module = importlib.import_module(f"doctune_kfp.components.{name}.component")
    return module.rerun_stage_component(stage) if name == FACTORY else getattr(module, name)


def declared(entries: list[dict]) -> list[tuple[str, str]]:
    return [(entry["name"], entry["type"]) for entry in entries]


def test_every_stage_has_a_component_folder():
    assert set(STAGES) <= set(FOLDERS)
    assert FACTORY in FOLDERS


@pytest.mark.parametrize("name", FOLDERS)
def test_metadata_declares_the_components_inputs_and_outputs(name):
    assert (COMPONENTS / name / "metadata.yaml").is_file(), f"components/{name}/metadata.yaml is missing"
    meta = metadata(name)
    assert isinstance(meta, dict) and set(meta) >= REQUIRED, sorted(REQUIRED - set(meta or {}))
    assert meta["name"] == name
    spec = component(name).component_spec
    assert declared(meta["inputs"]) == [(key, value.type) for key, value in (spec.inputs or {}).items()]
    assert declared(meta["outputs"]) == [(key, value.type) for key, value in (spec.outputs or {}).items()]
    assert all(entry["description"].strip() for entry in meta["inputs"] + meta["outputs"])
    assert meta["description"].strip() and meta["stability"] == "beta" and meta["owners"] == ["doctune maintainers"]


@pytest.mark.parametrize("name", FOLDERS)
def test_stage_and_config_sections(name):
    meta = metadata(name)
    if name not in STAGES:  # bookkeeping, and the rerun factory (its stage is an argument)
        assert meta["stage"] is None and "config_sections" not in meta
        return
    spec = STAGES[name]
    assert meta["stage"] == name
    assert meta["config_sections"] == list(spec.sections)
    typed = {entry["name"]: entry["type"] for entry in meta["outputs"] if entry["type"] != "String"}
    assert typed == {output: KFP_KIND[kind] for output, (_, kind) in spec.kfp_outputs.items()}


@pytest.mark.parametrize("name", FOLDERS)
def test_image_and_versions(name):
    meta = metadata(name)
    assert meta["image"]["tag"] == "package version"
    if name == FACTORY:  # one image per stage it may be built for
        built = {stage: repository for repository, stages in meta["image"]["repository"].items() for stage in stages}
        assert set(built) == set(STAGES)
        images = {stage: component(name, stage).component_spec.implementation.container.image for stage in STAGES}
    else:
        built = {name: meta["image"]["repository"]}
        images = {name: component(name).component_spec.implementation.container.image}
    assert {stage: image.rsplit(":", 1) for stage, image in images.items()} == {
        stage: [repository, __version__] for stage, repository in built.items()
    }
    pins = {entry["name"]: entry["version"] for entry in meta["dependencies"]["kubeflow"]}
    assert pins == {"kfp": version("kfp"), "kfp-kubernetes": version("kfp-kubernetes")}


@pytest.mark.parametrize("name", [name for name in FOLDERS if name != FACTORY])
def test_resources_are_the_cluster_defaults(name):
    cluster = ClusterConfig()
    resources = metadata(name)["resources"]
    default = cluster.resources.get(name, cluster.bookkeeping)  # as pipelines.placement.place looks them up
    assert (resources["cpu"], resources["memory"]) == (default.cpu, default.memory)
    assert resources["config"] == (f"cluster.resources.{name}" if name in cluster.resources else "cluster.bookkeeping")
    if name not in cluster.gpu.stages:
        assert "gpu" not in resources
        return
    gpu = resources["gpu"]
    assert (gpu["count"], gpu["accelerator"], gpu["node_selector"]) == (
        cluster.gpu.count,
        cluster.gpu.accelerator_type,
        cluster.gpu.node_selector,
    )
    assert gpu["tolerations"] == [toleration.model_dump(exclude_none=True) for toleration in cluster.gpu.tolerations]


@pytest.mark.parametrize("name", FOLDERS)
def test_readme_names_every_input_and_output(name):
    readme = COMPONENTS / name / "README.md"
    assert readme.is_file(), f"components/{name}/README.md is missing"
    text = readme.read_text()
    entries = metadata(name)["inputs"] + metadata(name)["outputs"]
    missing = [entry["name"] for entry in entries if f"`{entry['name']}`" not in text]
    assert not missing, f"components/{name}/README.md does not mention {missing}"
    if name in STAGES:
        assert f"doctune stage {name}" in text
