"""manifests/ (kustomize): rendered with `kubectl kustomize` and every object validated offline against the
Kubernetes schemas (kubernetes-validate); no API server can run here to apply them. The InferenceService `doctune
deploy` sends (KServe's CRD, which kubernetes-validate has no schema for) is validated as the Pod it describes."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import doctune
from doctune.cluster import inference_service
from doctune.config import ClusterConfig, DeployConfig, RunConfig

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
    # doctune.cluster.inference_service (the deploy step): read the InferenceService, create it or merge-patch it;
    # create the doctune predictor's run-config ConfigMap (named by its contents: never updated, so never read) and
    # delete the one the previous revision read (create and delete, as above).
    needed |= {("serving.kserve.io", "inferenceservices", verb) for verb in ("get", "create", "patch")}
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


# -- the InferenceService of `doctune deploy` ------------------------------------------------------------------------

SERVING = REPO / "manifests" / "base" / "serving"
# The fields of KServe's v1beta1 PredictorSpec that are not a Kubernetes PodSpec's (ComponentExtensionSpec): the
# rest of the predictor is a PodSpec and is validated as one.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas"}


@pytest.mark.parametrize("server", ["doctune", "llama-cpp"])
def test_the_reference_inferenceservices_are_what_deploy_sends(server):
    path = SERVING / inference_service.REFERENCE_MANIFESTS[server].name
    stale = f"{path.relative_to(REPO)} is stale: run `make config-docs` and commit it"
    assert path.read_text() == inference_service.reference_manifest(server), stale


def _as_pod(isvc: dict) -> dict:
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) - KSERVE_PREDICTOR_FIELDS >= {"containers", "serviceAccountName", "securityContext"}
    spec = {key: value for key, value in predictor.items() if key not in KSERVE_PREDICTOR_FIELDS}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"], "spec": spec}


def _validated(isvc: dict) -> None:
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    try:
        kubernetes_validate.validate(_as_pod(isvc), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"the InferenceService's predictor as a Pod: {error.message} at {list(error.path)}")
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 1  # no scale to zero: a model loads in minutes
    assert predictor["serviceAccountName"] == "doctune-serving"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    context = {**predictor["securityContext"], **container["securityContext"]}
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0 and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")


MODEL = inference_service.ServedModel("handbook", "7", "gguf-q4_k_m", "model-q4_k_m.gguf",
                                      "s3://bucket/mlflow/1/abc/artifacts/gguf-q4_k_m", "sha256:" + "0" * 64,
                                      "mlflow-artifacts:/1/abc/artifacts/gguf-q4_k_m")  # fmt: skip


def cluster_config(**sections) -> RunConfig:
    """A run config as a cluster's: MLflow in the cluster, the PDFs on the cache volume."""
    return RunConfig.model_validate({
        "tracking": {"uri": "http://mlflow.team-docs.svc.cluster.local:5000"},
        "ingest": {"pdfs": "/var/cache/doctune/corpus"}, **sections,
    })  # fmt: skip


@pytest.mark.parametrize("gpus", [0, 2])
def test_the_inferenceservice_runs_llama_server_on_the_champions_storage_uri_as_a_valid_non_root_pod(gpus):
    image = "ghcr.io/ggml-org/llama.cpp:server-cuda-b8840" if gpus else DeployConfig().image
    config = cluster_config(deploy={"server": "llama-cpp", "gpus": gpus, "image": image}, serve={"n_ctx": 8192})
    isvc = inference_service.manifest(config, "team-docs", MODEL)
    _validated(isvc)
    annotations = isvc["metadata"]["annotations"]
    assert annotations["doctune.ai/model-version"] == "7" and annotations["doctune.ai/artifact-digest"] == MODEL.digest
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["image"] == image and "volumes" not in predictor
    # KServe's storage initializer fills /mnt/models from STORAGE_URI of the container named kserve-container.
    assert container["env"] == [{"name": "STORAGE_URI", "value": "s3://bucket/mlflow/1/abc/artifacts/gguf-q4_k_m"}]
    args = container["args"]
    assert args[args.index("--model") + 1] == "/mnt/models/model-q4_k_m.gguf" and args[args.index("--ctx-size") + 1] == "8192"
    assert args[args.index("--port") + 1] == "8080"
    limits = container["resources"]["limits"]
    if gpus:
        assert limits["nvidia.com/gpu"] == "2" and args[args.index("--n-gpu-layers") + 1] == "999"
        assert predictor["nodeSelector"] == {"doctune.io/pool": "gpu"} and predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in limits and "--n-gpu-layers" not in args and "nodeSelector" not in predictor


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_doctune_inferenceservice_runs_doctune_serve_with_the_pipelines_image_volume_and_secrets(gpus, monkeypatch):
    config = inference_service.pod_config(cluster_config(deploy={"gpus": gpus}))
    configmap = inference_service.config_map(config, "team-docs")
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    isvc = inference_service.manifest(config, "team-docs", MODEL, configmap["metadata"]["name"])
    _validated(isvc)
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    flavour = "cuda" if gpus else "cpu"
    assert container["image"] == f"ghcr.io/doctune/doctune-{flavour}:{doctune.__version__}"  # the components' image
    command = container["command"]
    assert command[:2] == ["doctune", "serve"] and command[command.index("--version") + 1] == "7"
    assert command[command.index("--config") + 1] == "/etc/doctune/serve/run.yaml"
    # The logs go to the cache volume, where the pipeline's synth reads them (its pods' config is the same).
    assert command[-2:] == ["--set", "serve.log_dir=/var/cache/doctune/workdir/doctune/serving"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "doctune-model-cache"}} in predictor["volumes"]
    assert {"name": "run-config", "configMap": {"name": configmap["metadata"]["name"]}} in predictor["volumes"]
    assert {"name": "cache", "mountPath": "/var/cache/doctune"} in container["volumeMounts"]
    assert "STORAGE_URI" not in {e["name"] for e in container["env"]}  # doctune serve fetches and verifies itself
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secrets["MLFLOW_TRACKING_PASSWORD"] == "doctune-mlflow" and secrets["AWS_ACCESS_KEY_ID"] == "doctune-object-store"
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": 8080}  # a download and load, not a hang
    assert ({"name": "N_GPU_LAYERS", "value": "-1"} in container["env"]) is bool(gpus)
    assert ("nodeSelector" in predictor) is bool(gpus)
    if gpus:  # the llama.cpp server doctune serve starts (llama-cpp-python's) takes it from the environment
        from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
        from llama_cpp.server.settings import ModelSettings, Settings

        monkeypatch.setenv("N_GPU_LAYERS", "-1")
        parser = argparse.ArgumentParser()
        add_args_from_model(parser, Settings)
        args = parser.parse_args(["--model", "m.gguf", "--host", "127.0.0.1", "--port", "1", "--n_ctx", "4096"])
        assert parse_model_from_args(ModelSettings, args).n_gpu_layers == -1


def test_the_predictors_service_account_is_installed_with_the_base():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render("manifests/base")}
    account = objects[("ServiceAccount", DeployConfig().service_account)]
    assert account["secrets"] == [{"name": "doctune-serving-storage"}]  # the storage initializer's credentials
    assert "InferenceService" not in {kind for kind, _ in objects}  # doctune deploy creates it, with the champion


def test_the_page_extraction_serving_example_is_a_valid_pod_sized_like_the_training_pages():
    from doctune.config import PagesConfig

    isvc = yaml.safe_load((REPO / "manifests/examples/page-extraction-inferenceservice.yaml").read_text())
    _validated(isvc)
    (container,) = isvc["spec"]["predictor"]["containers"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "/mnt/models" and args[args.index("--port") + 1] == "8080"
    # The served images are capped where training rendered them, one page per request.
    assert json.loads(args[args.index("--mm-processor-kwargs") + 1]) == {"max_pixels": PagesConfig().render.max_pixels}
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1]) == {"image": 1}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
