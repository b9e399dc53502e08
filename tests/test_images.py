"""The container images (images/): checked as text here, since no docker engine runs on this machine."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from doctune import __version__
from doctune.stages import STAGES
from doctune_kfp.components.images import CPU_IMAGE, CUDA_STAGES, GPU_IMAGE, image_for, retag

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "images" / "cpu" / "Dockerfile", "cuda": REPO / "images" / "cuda" / "Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_runs_as_a_non_root_user_from_a_pinned_base(name):
    steps = instructions(DOCKERFILES[name])
    (base,) = [args for op, args in steps if op == "FROM"]
    tag = base.partition(":")[2]
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: base {base!r} is not pinned to a version"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0, f"{name}: the last USER must be a numeric non-root uid"
    assert [op for op, _ in steps].index("USER") > max(i for i, (op, _) in enumerate(steps) if op == "RUN")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_installs_the_package_with_the_lock_file_and_the_pinned_torch(name):
    runs = " ".join(args for op, args in instructions(DOCKERFILES[name]) if op == "RUN")
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch=="))
    assert re.search(r"pip install [^&]*-c requirements/lock\.txt [^&]*\"?\.\[serve[a-z,]*\]\"?", runs), name
    assert torch_pin in runs, f"{name}: installs a torch other than pyproject's {torch_pin}"
    assert "-DGGML_NATIVE=OFF" in runs, f"{name}: llama.cpp must not be built for the build machine's CPU only"


def test_lock_file_pins_every_dependency_at_pyprojects_version():
    locked = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            locked[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    project = pyproject()["project"]
    pins = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for pin in pins:
        name, version = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(.+)$", pin).groups()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key == "torch":
            continue  # CPU or CUDA build, by where it is installed
        assert locked.get(key) == version, f"{name}: pyproject pins {version}, lock.txt has {locked.get(key)}"


def test_components_name_the_image_of_their_stage_and_follow_registry_and_tag():
    assert CPU_IMAGE.endswith(f"/doctune-cpu:{__version__}") and GPU_IMAGE.endswith(f"/doctune-cuda:{__version__}")
    assert {s for s in STAGES if image_for(s) == GPU_IMAGE} == set(CUDA_STAGES)
    assert set(CUDA_STAGES) == {"cpt", "sft", "dpo", "merge", "quantize", "page_sft", "page_merge", "page_quantize", "page_gate"}
    assert retag(GPU_IMAGE, "registry.local:5000/team/", "1.2.3") == "registry.local:5000/team/doctune-cuda:1.2.3"
    assert retag("python:3.11", "registry.local", "1") == "python:3.11"


def test_make_images_tags_both_images_with_the_package_version():
    import subprocess

    dry = subprocess.run(["make", "-n", "images", "REGISTRY=reg.example/ml"], cwd=REPO, capture_output=True, text=True)
    assert f"-t reg.example/ml/doctune-cpu:{__version__}" in dry.stdout
    assert f"-t reg.example/ml/doctune-cuda:{__version__}" in dry.stdout
