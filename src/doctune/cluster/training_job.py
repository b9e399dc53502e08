"""Multi-node full fine-tunes: a Kubeflow training job (PyTorchJob, or Trainer v2's TrainJob) created through
the Kubernetes API from inside the training component, watched until it ends.

Every node runs `torchrun -m doctune.train.worker <job.json>`; torchrun takes nodes, rank and master address
from the PET_* variables the training operator sets. job.json, the tokenized data, checkpoints and the output
lie on the cache volume all pods mount; the ZeRO-3 config is a ConfigMap mounted into every pod.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from doctune import __version__
from doctune.cluster import kube

DEEPSPEED_MOUNT = "/etc/doctune/deepspeed"
DEEPSPEED_FILE = "ds_config.json"


class TrainingJobError(RuntimeError):
    """The training job could not be created, failed, or ran out of time; the message says which and why."""


@dataclass(frozen=True)
class JobKind:
    group: str
    version: str
    plural: str
    kind: str
    succeeded: frozenset[str]
    failed: frozenset[str]


KINDS = {
    "PyTorchJob": JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", frozenset({"Succeeded"}), frozenset({"Failed"})),
    "TrainJob": JobKind(
        "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", frozenset({"Complete"}), frozenset({"Failed"})
    ),
}


def cuda_image(cluster: dict) -> str:
    return f"{cluster['image_registry'].rstrip('/')}/doctune-cuda:{cluster['image_tag'] or __version__}"


def job_name(stage: str, run_id: str) -> str:
    """A DNS-1123 name, unique per stage run."""
    return re.sub(r"[^a-z0-9-]", "-", f"doctune-{stage}-{run_id[:12]}".lower()).strip("-")[:52]


def _container(cluster: dict, command: list[str], gpus: int, env: dict[str, str]) -> dict:
    resources = cluster["resources"].get("sft") or cluster["bookkeeping"]
    limits = {"cpu": resources["cpu_limit"] or resources["cpu"], "memory": resources["memory_limit"] or resources["memory"]}
    limits[cluster["gpu"]["accelerator_type"]] = str(gpus)
    secrets = [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret["secret"], "key": key, "optional": secret["optional"]}}}
        for secret in cluster["secrets"]
        for key, variable in secret["env"].items()
    ]
    return {
        "name": "pytorch",  # PyTorchJob looks for a container of this name
        "image": cuda_image(cluster),
        "command": command,
        "env": [*secrets, *({"name": k, "value": v} for k, v in {"HF_HUB_OFFLINE": "1", **env}.items())],
        "resources": {"requests": {"cpu": resources["cpu"], "memory": resources["memory"]}, "limits": limits},
        "volumeMounts": [
            {"name": "cache", "mountPath": cluster["cache_volume"]["mount_path"]},
            {"name": "deepspeed", "mountPath": DEEPSPEED_MOUNT, "readOnly": True},
        ],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
    }


def _pod_spec(cluster: dict, container: dict, configmap: str) -> dict:
    volume = cluster["cache_volume"]
    cache = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": volume["name"]}}
        if volume["kind"] == "pvc"
        else {"name": "cache", "emptyDir": {"sizeLimit": volume["size"]}}
    )
    return {
        "serviceAccountName": cluster["service_account"],
        "priorityClassName": cluster["training_job"]["priority_class"],
        "nodeSelector": dict(cluster["gpu"]["node_selector"]),
        "tolerations": [{k: v for k, v in t.items() if v is not None} for t in cluster["gpu"]["tolerations"]],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
        "containers": [container],
        "volumes": [cache, {"name": "deepspeed", "configMap": {"name": configmap}}],
    }


def job_manifest(
    name: str, namespace: str, cluster: dict, command: list[str], nodes: int, gpus_per_node: int, env: dict[str, str]
) -> dict:
    """The training job object for `cluster['training_job']['kind']`."""
    settings = cluster["training_job"]
    kind = KINDS[settings["kind"]]
    configmap = f"{name}-deepspeed"
    labels = {"app.kubernetes.io/name": "doctune", "app.kubernetes.io/component": "training"}
    meta = {"name": name, "namespace": namespace, "labels": labels}
    container = _container(cluster, command, gpus_per_node, env)
    if kind.kind == "PyTorchJob":
        template = {"metadata": {"labels": labels}, "spec": _pod_spec(cluster, container, configmap)}
        replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
        if nodes > 1:
            replicas["Worker"] = {"replicas": nodes - 1, "restartPolicy": "OnFailure", "template": template}
        spec = {
            "nprocPerNode": str(gpus_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 2, "ttlSecondsAfterFinished": 7 * 24 * 3600},
            "pytorchReplicaSpecs": replicas,
        }
    else:  # Trainer v2: the runtime supplies the pod template; the job names image, command, nodes, GPUs
        pod = _pod_spec(cluster, container, configmap)
        spec = {
            "runtimeRef": {"name": settings["runtime"]},
            "trainer": {
                "image": container["image"],
                "command": command,
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": container["resources"],
                "env": container["env"],
            },
            "podTemplateOverrides": [
                {
                    "targetJobs": [{"name": "node"}],
                    "spec": {
                        "serviceAccountName": pod["serviceAccountName"],
                        "priorityClassName": pod["priorityClassName"],
                        "nodeSelector": pod["nodeSelector"],
                        "tolerations": pod["tolerations"],
                        "securityContext": pod["securityContext"],
                        "volumes": pod["volumes"],
                        "containers": [{"name": "node", "volumeMounts": container["volumeMounts"]}],
                    },
                }
            ],
        }
    return {"apiVersion": f"{kind.group}/{kind.version}", "kind": kind.kind, "metadata": meta, "spec": spec}


def _conditions(obj: dict) -> list[dict]:
    return [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]


def run_training_job(
    name: str,
    cluster: dict,
    command: list[str],
    nodes: int,
    gpus_per_node: int,
    deepspeed_config: dict,
    env: dict[str, str] | None = None,
    report: Callable[[str], None] = lambda line: print(line, flush=True),  # the component pod's log
) -> dict:
    """Create the ZeRO-3 ConfigMap and the job, follow its conditions until it ends; returns the final object.

    Raises TrainingJobError with the job's reason when it fails, or after deleting it when it runs past the timeout.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    settings = cluster["training_job"]
    kind = KINDS[settings["kind"]]
    namespace = kube.namespace(settings["namespace"], "cluster.training_job.namespace")
    api = kube.api_client(settings["api_server"], "cluster.training_job.api_server")
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-deepspeed", "namespace": namespace},
        "data": {DEEPSPEED_FILE: json.dumps(deepspeed_config, indent=1)},
    }
    manifest = job_manifest(name, namespace, cluster, command, nodes, gpus_per_node, env or {})
    where = f"{kind.kind} {namespace}/{name}"
    try:
        core.create_namespaced_config_map(namespace, configmap)
        custom.create_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, manifest)
    except ApiException as exc:
        raise TrainingJobError(f"creating {where} failed: HTTP {exc.status} {exc.reason}: {kube.api_message(exc)}") from None
    report(f"{where}: created ({nodes} nodes x {gpus_per_node} processes)")
    deadline = time.monotonic() + settings["timeout_s"]
    seen: set[tuple[str, str]] = set()
    try:
        while True:
            try:
                obj = custom.get_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
            except ApiException as exc:
                if exc.status == 404:
                    raise TrainingJobError(f"{where} was deleted while it ran") from None
                if exc.status >= 500:  # a transient API server error: keep watching until the deadline
                    report(f"{where}: API server answered {exc.status}; retrying")
                    obj = {}
                else:
                    raise TrainingJobError(f"reading {where} failed: HTTP {exc.status}: {kube.api_message(exc)}") from None
            for condition in _conditions(obj):
                key = (condition["type"], condition.get("reason", ""))
                if key not in seen:
                    seen.add(key)
                    report(f"{where}: {condition['type']} {condition.get('reason', '')} {condition.get('message', '')}".rstrip())
                if condition["type"] in kind.failed:
                    raise TrainingJobError(
                        f"{where} failed: {condition.get('reason', 'unknown reason')}: {condition.get('message', '')} "
                        f"(pods: kubectl -n {namespace} logs -l training.kubeflow.org/job-name={name})"
                    )
                if condition["type"] in kind.succeeded:
                    return obj
            if time.monotonic() > deadline:
                _delete(custom, kind, namespace, name)
                raise TrainingJobError(
                    f"{where} did not finish within cluster.training_job.timeout_s={settings['timeout_s']:g}s; deleted it"
                )
            time.sleep(settings["poll_s"])
    finally:
        try:
            core.delete_namespaced_config_map(f"{name}-deepspeed", namespace)
        except ApiException as exc:
            report(f"could not delete ConfigMap {name}-deepspeed: HTTP {exc.status}")


def _delete(custom, kind: JobKind, namespace: str, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.delete_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
    except ApiException as exc:
        if exc.status != 404:
            raise
