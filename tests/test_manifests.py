"""manifests/ (kustomize): rendered with `kubectl kustomize` and every object validated offline against the
Kubernetes schemas (kubernetes-validate); no API server can run here to apply them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from doctune.config import ClusterConfig

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = ["manifests/base", "manifests/overlays/example"]
K8S_VERSION = "1.33.0"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render manifests/: apt-get install kubectl"
    done = subprocess.run([kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_object_renders_and_validates_against_the_kubernetes_schemas(path):
    objects = render(path)
    kinds = {obj["kind"] for obj in objects}
    assert {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "PriorityClass", "ResourceQuota",
            "Deployment", "StatefulSet", "Service"} <= kinds  # fmt: skip
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path}: {obj['kind']} {obj['metadata']['name']}: {error.message} at {list(error.path)}")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_containers_run_as_non_root_without_privilege_escalation(path):
    for obj in render(path):
        if obj["kind"] not in WORKLOADS:
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{obj['kind']} {obj['metadata']['name']}/{container['name']}"
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert ":" in container["image"] and not container["image"].endswith(":latest"), where


def test_pipeline_pods_may_do_only_what_the_components_do():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render("manifests/base")}
    cluster = ClusterConfig()
    role = objects[("Role", cluster.service_account)]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip
    # doctune.cluster.training_job: create the ZeRO-3 ConfigMap and the job, follow the job, delete both.
    needed = {("", "configmaps", "create"), ("", "configmaps", "delete")}
    needed |= {(g, r, v) for g, r in (("kubeflow.org", "pytorchjobs"), ("trainer.kubeflow.org", "trainjobs"))
               for v in ("create", "get", "delete")}  # fmt: skip
    assert granted == needed
    binding = objects[("RoleBinding", cluster.service_account)]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": cluster.service_account, "namespace": "kubeflow"}]
    assert ("ServiceAccount", cluster.service_account) in objects
    # The names the cluster config refers to exist here.
    assert ("PersistentVolumeClaim", cluster.cache_volume.name) in objects
    assert objects[("PersistentVolumeClaim", cluster.cache_volume.name)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("PriorityClass", cluster.training_job.priority_class) in objects


def test_mlflow_serves_a_postgres_store_and_proxied_s3_artifacts_with_credentials_from_secrets():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render("manifests/base")}
    mlflow = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(mlflow["args"])
    assert "postgresql://" in command and "@mlflow-postgres:5432/mlflow" in command
    assert '--artifacts-destination "s3://' in command and "--serve-artifacts" in command
    env = {e["name"]: e for e in mlflow["env"]}
    for name in ("DB_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name  # never a literal value
    assert objects[("Service", "mlflow")]["spec"]["ports"][0]["port"] == 5000
    assert mlflow["image"] == "ghcr.io/doctune/doctune-cpu:0.1.0"
    postgres = objects[("StatefulSet", "mlflow-postgres")]["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"] for e in postgres["env"] if "valueFrom" in e} == {"POSTGRES_USER", "POSTGRES_PASSWORD"}


def test_an_overlay_moves_namespace_images_and_sizes():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render("manifests/overlays/example")}
    assert {o["metadata"].get("namespace") for k, o in objects.items() if k[0] != "PriorityClass"} == {"team-docs"}
    image = objects[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/ml/doctune-cpu:0.1.0"
    assert objects[("ResourceQuota", "doctune-gpu")]["spec"]["hard"]["requests.nvidia.com/gpu"] == "32"
