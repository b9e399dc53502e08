"""The champion on a cluster: a KServe InferenceService whose predictor is `doctune serve` or llama.cpp's server.

deploy.server doctune (the default): the predictor runs the pipeline's own image (doctune-cpu, or doctune-cuda
with deploy.gpus) with `doctune serve --version N`, which fetches the version's variant, merged model and retrieval
index from MLflow and checks them against their digests itself, and serves them as it does locally: the model's
system prompt, retrieval with citations, the gate's abstention threshold, and the request and feedback logs. Its run
config is the pipeline pods' (`pod_config`: doctune.cluster.for_cluster, tracking on the MLflow server, the workdir
on the cache volume) in a ConfigMap named by a digest of its contents; the cache volume is mounted as in every
pipeline pod, and the logs go to flywheel.log_dir of that config, the folder the next run's synth reads.

deploy.server llama-cpp: KServe's storage initializer copies the folder named by the container's STORAGE_URI (the
registry version's GGUF variant in the artifact store) to /mnt/models before the server starts; llama-server loads
the GGUF from there, and nothing else is applied or logged.

`apply` creates the ConfigMap (doctune), then creates the service or merge-patches it in place (a new revision:
KServe keeps the old one serving until the new one is ready), waits for it to be ready, and deletes the ConfigMap
the previous revision read. The objects are built here only: `python -m doctune.cluster.inference_service` writes the
reference copy in manifests/base/serving/.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from doctune import __version__, flywheel
from doctune.cluster import for_cluster, kube
from doctune.config import ConfigError, DeployConfig, RunConfig

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
CONTAINER = "kserve-container"  # KServe's predictor container (and where it reads STORAGE_URI from)
MODEL_DIR = "/mnt/models"  # where the storage initializer puts what STORAGE_URI names
PORT = 8080
IMAGE_UID = 10001  # the doctune images' user (images/*/Dockerfile); llama-server runs as it too, reading only
ANNOTATION = "doctune.ai/"
VERSION_ANNOTATION = f"{ANNOTATION}model-version"
DIGEST_ANNOTATION = f"{ANNOTATION}artifact-digest"
# A revision KServe will not bring up: report it at once instead of waiting out deploy.ready_timeout_s.
BLOCKED = {"BlockedByFailedLoad", "InvalidSpec"}
REFERENCE_MANIFEST = Path("manifests/base/serving/inferenceservice.yaml")
# deploy.server doctune: the run config as a file, and the volumes of the predictor pod.
CONFIG_VOLUME, CACHE_VOLUME = "run-config", "cache"
CONFIG_MOUNT, CONFIG_FILE = "/etc/doctune/serve", "run.yaml"
# doctune serve downloads the version and loads it before it answers /health: an hour before the pod is restarted.
STARTUP_S = 3600
LOOPBACK = ("localhost", "::1")
LABELS = {"app.kubernetes.io/name": "doctune", "app.kubernetes.io/component": "serving", "app.kubernetes.io/part-of": "doctune"}


@dataclass(frozen=True)
class ServedModel:
    """What one revision of the service serves: a registry version's GGUF variant."""

    registered_model: str
    version: str
    variant: str
    gguf_file: str  # path of the .gguf inside the variant folder
    storage_uri: str | None  # server llama-cpp: where KServe's storage initializer reads the folder
    digest: str  # the variant folder's manifest digest (doctune.artifacts)
    source_uri: str  # the folder's artifact URI in MLflow


def pod_config(config: RunConfig) -> RunConfig:
    """The run config the doctune predictor pods read: the pipeline pods' (tracking on the MLflow server, the
    workdir on the cache volume), with MLflow at deploy.tracking_uri where set. Raises ConfigError where the pods
    could not reach the registry or would log where the next run's synth does not read."""
    volume = config.cluster.cache_volume
    if volume.kind != "pvc":
        raise ConfigError(
            "deploy.server doctune logs requests where the next run's synth reads them, on the shared cache volume; "
            f"cluster.cache_volume.kind is {volume.kind!r} (one volume per pod): set it to 'pvc', or deploy.server "
            "llama-cpp (no logs)"
        )
    setting = "tracking.uri"
    if config.deploy.tracking_uri:
        setting = "deploy.tracking_uri"
        config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": config.deploy.tracking_uri})})
    host = urlparse(config.tracking_uri).hostname or ""
    if host in LOOPBACK or host.startswith("127."):
        raise ConfigError(
            f"{setting} {config.tracking_uri} is on this machine (a port-forward?), where the predictor pods cannot "
            "reach MLflow: set deploy.tracking_uri to the in-cluster URI, e.g. http://mlflow.kubeflow.svc.cluster.local:5000"
        )
    config = for_cluster(config)
    logs, mount = PurePosixPath(flywheel.log_dir(config).as_posix()), PurePosixPath(volume.mount_path)
    if mount not in logs.parents:
        raise ConfigError(
            f"the serving logs' folder {logs} (flywheel.log_dir, else serve.log_dir) is not on the cache volume the "
            f"pods mount at {mount}: the predictor would log where synth does not read; leave both null (<workdir>/"
            "serving on the volume) or set them to a folder under the mount"
        )
    return config


def log_dir(config: RunConfig) -> str:
    """Where the doctune predictor logs: the folder the pipeline's synth reads (flywheel.log_dir of `config`)."""
    return flywheel.log_dir(config).as_posix()


def config_map(config: RunConfig, namespace: str) -> dict:
    """The ConfigMap holding `config` (a pod_config) for the doctune predictor, named by a digest of its contents:
    a changed config is a new ConfigMap and a new revision, never an edit under a running one."""
    text = config.to_yaml()
    name = f"{config.deploy.name}-config-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS)},
            "data": {CONFIG_FILE: text}}  # fmt: skip


def doctune_image(config: RunConfig) -> str:
    """The pipeline's image (components/images.py, moved to cluster.image_registry and image_tag as compiled)."""
    cluster = config.cluster
    flavour = "cuda" if config.deploy.gpus else "cpu"
    return f"{cluster.image_registry.rstrip('/')}/doctune-{flavour}:{cluster.image_tag or __version__}"


def _resources(settings: DeployConfig, accelerator: str) -> dict:
    resources = settings.resources
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    limits = {"cpu": resources.cpu_limit or resources.cpu, "memory": resources.memory_limit or resources.memory}
    if settings.gpus:
        limits[accelerator] = str(settings.gpus)
    return {"requests": requests, "limits": limits}


def _llama_cpp(config: RunConfig, model: ServedModel) -> tuple[dict, dict]:
    """(container, pod fields) of llama.cpp's server on the GGUF the storage initializer copies."""
    if model.storage_uri is None:
        raise ValueError("deploy.server llama-cpp needs the variant's storage URI")
    args = ["--model", f"{MODEL_DIR}/{model.gguf_file}", "--host", "0.0.0.0", "--port", str(PORT), "--ctx-size",
            str(config.serve.n_ctx)]  # fmt: skip
    if config.deploy.gpus:
        args += ["--n-gpu-layers", "999"]  # every layer on the GPU
    container = {
        "name": CONTAINER,
        "image": config.deploy.image,
        "args": args,
        "env": [{"name": "STORAGE_URI", "value": model.storage_uri}],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        # /health answers 503 while the model loads and 200 once it serves: traffic only then. The liveness check
        # is the port, which llama-server opens before loading, so a long load is not mistaken for a hang.
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"tcpSocket": {"port": PORT}, "initialDelaySeconds": 30, "periodSeconds": 30, "failureThreshold": 5},
    }
    return container, {}


def _doctune(config: RunConfig, model: ServedModel, configmap: str) -> tuple[dict, dict]:
    """(container, pod fields) of `doctune serve --version N` with the run config of ConfigMap `configmap`."""
    cluster = config.cluster
    command = ["doctune", "serve", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}", "--version", model.version,
               "--variant", model.variant, "--host", "0.0.0.0", "--port", str(PORT),
               "--set", f"serve.log_dir={log_dir(config)}"]  # fmt: skip
    # Exactly as the pipeline's components get them (pipelines/placement.py): MLflow auth, object store.
    env = [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret.secret, "key": key, "optional": secret.optional}}}
        for secret in cluster.secrets
        for key, variable in secret.env.items()
    ]
    if config.deploy.gpus:
        # doctune serve starts llama-cpp-python's server, which takes a setting it is not given as an option from
        # the environment: every layer on the GPU.
        env.append({"name": "N_GPU_LAYERS", "value": "-1"})

    def health(period_s: int, failures: int) -> dict:
        return {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": period_s, "failureThreshold": failures}

    container = {
        "name": CONTAINER,
        "image": doctune_image(config),
        "command": command,
        "env": env,
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        # doctune serve answers /health once the version is fetched, verified and loaded; until then the startup
        # probe holds the other two off.
        "startupProbe": health(10, STARTUP_S // 10),
        "readinessProbe": health(10, 3),
        "livenessProbe": health(30, 5),
        "volumeMounts": [
            {"name": CACHE_VOLUME, "mountPath": cluster.cache_volume.mount_path},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT, "readOnly": True},
        ],
    }
    volumes = [
        {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cluster.cache_volume.name}},
        {"name": CONFIG_VOLUME, "configMap": {"name": configmap}},
    ]
    return container, {"volumes": volumes}


def manifest(config: RunConfig, namespace: str, model: ServedModel, configmap: str | None = None) -> dict:
    """The InferenceService that serves `model` with deploy.server: doctune (`config` a pod_config, `configmap` the
    name of its config_map) or llama-cpp."""
    settings, gpu = config.deploy, config.cluster.gpu
    if settings.server == "doctune":
        if configmap is None:
            raise ValueError("deploy.server doctune needs the ConfigMap of the pods' run config")
        container, pod = _doctune(config, model, configmap)
    else:
        container, pod = _llama_cpp(config, model)
    container["resources"] = _resources(settings, gpu.accelerator_type)
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if settings.gpus:
        pod["nodeSelector"] = dict(gpu.node_selector)
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in gpu.tolerations]
    annotations = {
        f"{ANNOTATION}registered-model": model.registered_model,
        VERSION_ANNOTATION: model.version,
        f"{ANNOTATION}variant": model.variant,
        DIGEST_ANNOTATION: model.digest,
        f"{ANNOTATION}artifact-uri": model.source_uri,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": settings.name, "namespace": namespace, "labels": dict(LABELS), "annotations": annotations},
        "spec": {
            "predictor": {
                "minReplicas": settings.replicas,  # never scaled to zero: a cold start reloads the model
                "maxReplicas": settings.replicas,
                "serviceAccountName": settings.service_account,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": IMAGE_UID,
                    "runAsGroup": IMAGE_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                **pod,
                "containers": [container],
            }
        },
    }


def served_version(obj: dict) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(VERSION_ANNOTATION)


def _config_map_of(obj: dict | None) -> str | None:
    """The ConfigMap a (doctune) service's predictor reads its run config from."""
    volumes = (((obj or {}).get("spec") or {}).get("predictor") or {}).get("volumes") or []
    return next((v["configMap"].get("name") for v in volumes if v.get("name") == CONFIG_VOLUME and "configMap" in v), None)


def apply(
    settings: DeployConfig,
    desired: dict,
    report: Callable[[str], None] = lambda line: print(line, flush=True),
    configmap: dict | None = None,
) -> tuple[dict, str | None]:
    """Create `configmap` (the doctune predictor's run config) where given; create the InferenceService, or
    merge-patch it to `desired` (the same object, a new revision); then wait until it is ready
    (deploy.ready_timeout_s) and delete the ConfigMap only the previous revision read. Returns (the object as the API
    last showed it, the version served before).

    Raises kube.KubernetesError in one line: no API, the API refused, no KServe, or the revision did not come up.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = kube.api_client(settings.api_server, "deploy.api_server")
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    where = f"{KIND} {namespace}/{name}"
    call = {"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL,
            "_request_timeout": kube.REQUEST_TIMEOUT}  # fmt: skip
    doing = f"reading {where}"
    try:
        if configmap is not None:
            doing = f"creating ConfigMap {namespace}/{configmap['metadata']['name']}"
            try:
                core.create_namespaced_config_map(namespace, configmap, _request_timeout=kube.REQUEST_TIMEOUT)
            except ApiException as exc:
                if exc.status != 409:  # named by its contents: the one already there holds the same config
                    raise
            doing = f"reading {where}"
        try:
            current = custom.get_namespaced_custom_object(name=name, **call)
        except ApiException as exc:
            if exc.status != 404:
                raise
            current = None
        if current is None:
            doing = f"creating {where}"
            try:
                obj = custom.create_namespaced_custom_object(body=desired, **call)
            except ApiException as exc:
                if exc.status == 404:  # the name was free, so it is the kind that is missing
                    raise kube.KubernetesError(
                        f"the Kubernetes API at {kube.host_of(api)} has no {GROUP}/{VERSION} {PLURAL}: install KServe in "
                        "the cluster, or set deploy.enabled false"
                    ) from None
                raise
            previous = None
            report(f"{where}: created, serving version {served_version(desired)}")
        else:
            doing = f"patching {where}"
            # A JSON merge patch: the spec's lists (containers, args, env, volumes) are replaced whole, and the
            # predictor's fields the desired spec lacks (a GPU's node selector, the other server's volumes) removed;
            # labels and annotations others set stay. The object keeps its uid, so KServe rolls a new revision out.
            predictor = dict(desired["spec"]["predictor"])
            for field in (current.get("spec") or {}).get("predictor") or {}:
                predictor.setdefault(field, None)
            spec = {**desired["spec"], "predictor": predictor}
            patch = {"metadata": {k: desired["metadata"][k] for k in ("labels", "annotations")}, "spec": spec}
            obj = custom.patch_namespaced_custom_object(name=name, body=patch, **call)
            previous = served_version(current)
            report(f"{where}: patched, version {previous or 'unknown'} -> {served_version(desired)}")
        if settings.ready_timeout_s > 0:
            doing = f"reading {where}"
            # KServe moves traffic to a new revision only once it is ready: what served before goes on serving.
            before = "nothing serves yet" if current is None else f"version {previous or '(unknown)'} keeps serving"
            stale = _revision(current) if current is not None and _generation(obj) != _generation(current) else None
            obj = _wait_ready(custom, call, name, where, settings, report, before, stale)
            superseded = _config_map_of(current)
            if superseded and superseded != (configmap or {}).get("metadata", {}).get("name"):
                _delete_config_map(core, namespace, superseded, report)
    except ApiException as exc:
        raise kube.KubernetesError(f"{doing} failed: HTTP {exc.status} {exc.reason}: {kube.api_message(exc)}") from None
    except HTTPError as exc:
        raise kube.KubernetesError(
            f"{kube.unreachable(kube.host_of(api), exc)} while {doing}: set deploy.api_server, or run where the pod's "
            "service account or ~/.kube/config reaches the cluster"
        ) from None
    return obj, previous


def _delete_config_map(core, namespace: str, name: str, report: Callable[[str], None]) -> None:
    """The previous revision's run config, once the new revision serves; a failure is reported, not fatal."""
    from kubernetes.client.exceptions import ApiException

    try:
        core.delete_namespaced_config_map(name, namespace, _request_timeout=kube.REQUEST_TIMEOUT)
    except ApiException as exc:
        if exc.status != 404:
            report(f"ConfigMap {namespace}/{name} of the previous revision was not deleted: HTTP {exc.status} "
                   f"{exc.reason}: {kube.api_message(exc)}")  # fmt: skip
        return
    report(f"ConfigMap {namespace}/{name} of the previous revision deleted")


def _generation(obj: dict) -> int | None:
    return (obj.get("metadata") or {}).get("generation")


def _revision(obj: dict) -> str | None:
    """The predictor's latest created revision (serverless mode), from before a write."""
    return (((obj.get("status") or {}).get("components") or {}).get("predictor") or {}).get("latestCreatedRevision")


def _status_is_current(obj: dict, stale_revision: str | None) -> bool:
    """Whether the status speaks of the spec last written. observedGeneration says so where the controller sets it;
    KServe's does not (as read), so in serverless mode a created revision other than the one from before the write
    does. Without either (raw deployment mode), the status is taken as it is."""
    status = obj.get("status") or {}
    if status.get("observedGeneration"):
        return status["observedGeneration"] >= (_generation(obj) or 0)
    if stale_revision is not None:
        return _revision(obj) not in (None, stale_revision)
    return True


def _ready(obj: dict) -> tuple[bool, str]:
    """(the Ready condition is True, what it says)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), {})
    said = f"{ready.get('reason') or ''} {ready.get('message') or ''}".strip() or "no Ready condition yet"
    return ready.get("status") == "True", said


def _wait_ready(
    custom,
    call: dict,
    name: str,
    where: str,
    settings: DeployConfig,
    report: Callable[[str], None],
    before: str,
    stale_revision: str | None,
) -> dict:
    describe = f"kubectl -n {call['namespace']} describe {PLURAL} {name}"
    deadline = time.monotonic() + settings.ready_timeout_s
    while True:
        obj = custom.get_namespaced_custom_object(name=name, **call)
        current = _status_is_current(obj, stale_revision)
        ready, said = _ready(obj)
        if current and ready:
            report(f"{where}: ready at {(obj.get('status') or {}).get('url', '(no URL yet)')}")
            return obj
        model_status = (obj.get("status") or {}).get("modelStatus") or {}
        if current and model_status.get("transitionStatus") in BLOCKED:
            failure = model_status.get("lastFailureInfo") or {}
            cause = f"{model_status['transitionStatus']}: {failure.get('reason', '')} {failure.get('message', '')}".rstrip()
            raise kube.KubernetesError(f"{where}: the new revision does not come up ({cause}); {before} ({describe})")
        if time.monotonic() > deadline:
            raise kube.KubernetesError(
                f"{where} was not ready within deploy.ready_timeout_s={settings.ready_timeout_s:g}s ({said}); {before} "
                f"({describe})"
            )
        time.sleep(settings.poll_s)


def _example(server: str) -> tuple[RunConfig, ServedModel]:
    """The default settings with deploy.server `server`, on the MLflow server of manifests/base/mlflow, and an example
    version."""
    mount = PurePosixPath(RunConfig().cluster.cache_volume.mount_path)
    config = RunConfig.model_validate({
        "project": {"workdir": str(mount / "workdir" / "doctune")}, "ingest": {"pdfs": str(mount / "corpus")},
        "tracking": {"uri": "http://mlflow.kubeflow.svc.cluster.local:5000"}, "deploy": {"server": server},
    })  # fmt: skip
    variant = config.gate.variants[0]  # what serve.variant `gated` resolves to when the gate keeps it
    example = ServedModel(
        registered_model=config.project.name,
        version="1",
        variant=variant,
        gguf_file=f"model-{variant.removeprefix('gguf-')}.gguf",
        storage_uri=f"s3://doctune-artifacts/mlflow/1/<run id>/artifacts/{variant}" if server == "llama-cpp" else None,
        digest="sha256:<the variant folder's manifest digest>",
        source_uri=f"mlflow-artifacts:/1/<run id>/artifacts/{variant}",
    )
    return config, example


def reference_manifest(server: str = "doctune") -> str:
    """The YAML of manifests/base/serving/inferenceservice.yaml (server doctune, the default) or
    inferenceservice-llama-cpp.yaml: what `doctune deploy` sends for the default `deploy` settings, with an example
    version in the namespace of manifests/base."""
    import yaml

    config, example = _example(server)
    if server == "doctune":
        config = pod_config(config)
        obj = manifest(config, "kubeflow", example, configmap=f"{config.deploy.name}-config-<digest of its run config>")
        what = (
            "# deploy.server doctune (the default): `doctune serve --version N` in the pipeline's image, its run config\n"
            "# from a ConfigMap deploy creates beside it (named by a digest of it), request and feedback logs on the\n"
            "# cache volume where the next run's synth reads them. deploy.server llama-cpp: inferenceservice-llama-cpp.yaml.\n"
        )
    else:
        obj = manifest(config, "kubeflow", example)
        what = (
            "# deploy.server llama-cpp: llama.cpp's llama-server on the GGUF KServe's storage initializer copies; no\n"
            "# system prompt, retrieval, abstention threshold or logs.\n"
        )
    header = (
        "# GENERATED by `make config-docs` (python -m doctune.cluster.inference_service) from doctune's deploy code:\n"
        "# the InferenceService `doctune deploy` creates and patches, for the default `deploy` settings and an example\n"
        f"# version.\n{what}"
        "# It is not in any kustomization: the service is created by the deploy step with the champion's version,\n"
        "# and re-applying a file would point it back at whatever version the file names.\n"
    )
    return header + yaml.safe_dump(obj, sort_keys=False, width=120)


REFERENCE_MANIFESTS = {
    "doctune": REFERENCE_MANIFEST,
    "llama-cpp": REFERENCE_MANIFEST.with_name("inferenceservice-llama-cpp.yaml"),
}


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE_MANIFEST.parent
    for server, path in REFERENCE_MANIFESTS.items():
        out = folder / path.name
        out.write_text(reference_manifest(server))
        print(f"wrote {out}")
