"""An in-process Kubernetes API emulator on 127.0.0.1: ConfigMaps, Kubeflow training jobs (PyTorchJob, TrainJob) and
KServe InferenceServices.

No Kubernetes API server can run on this machine. This serves the REST paths the `kubernetes` client calls for
those objects: create (POST), read (GET), replace (PUT, with resourceVersion conflicts), JSON merge patch (PATCH,
RFC 7386, as CustomObjectsApi sends it; the strategic merge patch is refused for custom resources as the API server
refuses it) and delete, keeping uid, resourceVersion and generation (bumped when the spec changes) as the API
server does. Controllers stand in for the operators. For training jobs, the training operator and kubelet: each
replica's container command runs as a local process with the PET_* variables the operator sets (so torchrun forms a
real multi-node group on 127.0.0.1), ConfigMap volumes are mounted as local folders, and the job gets Created,
Running and Succeeded or Failed conditions. For InferenceServices, KServe's controller in serverless mode: after
a write that changes the spec, a new predictor revision is reported created and ready (`serving_ready`), or
failing to load (`serving_blocked`); nothing is served. A test may pass its own controllers
to script other outcomes.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from json_api import JsonApiServer

TRAINING_JOBS = {("kubeflow.org", "v1", "pytorchjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainjobs")}
INFERENCE_SERVICES = ("serving.kserve.io", "v1beta1", "inferenceservices")
CUSTOM = TRAINING_JOBS | {INFERENCE_SERVICES}
MERGE_PATCH = "application/merge-patch+json"

Controller = Callable[["KubeApi", dict], None]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(obj: dict, type_: str, reason: str, message: str = "") -> None:
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    for condition in conditions:
        if condition["type"] != type_:
            condition["status"] = "False"
    conditions.append({"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()})


def merge_patch(target, patch):
    """RFC 7386: objects merge key by key, null removes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class KubeApi(JsonApiServer):
    def __init__(self, controller: Controller | None = None, serving: Controller | None = None):
        super().__init__()
        self.objects: dict[tuple[str, str, str], dict] = {}  # (resource, namespace, name) -> object
        self.deleted: list[tuple[str, str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.content_types: list[str] = []  # of every PATCH, in order
        self.controller = controller or run_replicas_locally  # training jobs, once created
        self.serving = serving or serving_ready  # InferenceServices, after every write
        self.lock = threading.Lock()
        self.logs: dict[str, str] = {}
        self._version = 0

    def configmap_data(self, namespace: str, name: str) -> dict:
        return self.objects[("configmaps", namespace, name)]["data"]

    def _resource(self, path: str) -> tuple[str, str, str | None] | None:
        """(resource, namespace, name or None) of an /api/v1 ConfigMap or a known custom resource path."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"] and len(parts) in (5, 6) and parts[2] == "namespaces" and parts[4] == "configmaps":
            return "configmaps", parts[3], parts[5] if len(parts) == 6 else None
        if parts[0] == "apis" and len(parts) in (6, 7) and parts[3] == "namespaces" and (parts[1], parts[2], parts[5]) in CUSTOM:
            return parts[5], parts[4], parts[6] if len(parts) == 7 else None
        return None

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _written(self, resource: str, obj: dict) -> None:
        """Controllers react to a write, each in its own thread like an operator's reconcile loop."""
        if resource in {r for _, _, r in TRAINING_JOBS}:
            set_condition(obj, "Created", "JobCreated", f"{obj['kind']} {obj['metadata']['name']} is created.")
            threading.Thread(target=self.controller, args=(self, obj), daemon=True).start()
        elif resource == INFERENCE_SERVICES[2]:
            threading.Thread(target=self.serving, args=(self, obj), daemon=True).start()

    def _update(self, resource: str, obj: dict, new: dict) -> dict:
        """`obj` becomes `new` in place (controllers hold it); the API server owns metadata and, for custom
        resources, status (a subresource)."""
        meta = obj["metadata"]
        new_meta = {**new.get("metadata", {}), **{k: meta[k] for k in ("name", "namespace", "uid", "creationTimestamp")}}
        new_meta["resourceVersion"] = self._next_version()
        changed = new.get("spec") != obj.get("spec")
        new_meta["generation"] = meta.get("generation", 1) + (1 if changed else 0)
        status = obj.get("status")
        obj.clear()
        obj.update({**new, "metadata": new_meta})
        if status is not None and resource in {r for _, _, r in CUSTOM}:
            obj["status"] = status
        if changed:
            self._written(resource, obj)
        return obj

    def handle(self, method: str, path: str, query: dict, headers: dict, body: dict) -> tuple[int, dict]:
        self.requests.append((method, path))
        found = self._resource(path)
        if found is None:
            return 404, _status(404, "NotFound", f"the server could not find the requested resource ({path})")
        resource, namespace, name = found
        with self.lock:
            if method == "POST" and name is None:
                name = body.get("metadata", {}).get("name")
                key = (resource, namespace, name)
                if key in self.objects:
                    return 409, _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
                obj = {**body, "metadata": {**body["metadata"], "namespace": namespace, "uid": os.urandom(8).hex(),
                                            "creationTimestamp": _now(), "resourceVersion": self._next_version(),
                                            "generation": 1}}  # fmt: skip
                self.objects[key] = obj
                self._written(resource, obj)
                return 201, copy.deepcopy(obj)
            key = (resource, namespace, name)
            if key not in self.objects:
                return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
            obj = self.objects[key]
            if method == "GET":
                return 200, copy.deepcopy(obj)
            if method == "PUT":
                sent = body.get("metadata", {})
                if sent.get("name") != name:
                    return 400, _status(400, "BadRequest", f"the name of the object ({sent.get('name')}) does not match {name}")
                if sent.get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
                    return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the '
                                        "object has been modified; please apply your changes to the latest version")  # fmt: skip
                return 200, copy.deepcopy(self._update(resource, obj, body))
            if method == "PATCH":
                kind = headers.get("content-type", "").split(";")[0].strip()
                self.content_types.append(kind)
                if kind != MERGE_PATCH:
                    return 415, _status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                        f"accepted media types include: {MERGE_PATCH} (this emulator)")  # fmt: skip
                return 200, copy.deepcopy(self._update(resource, obj, merge_patch(obj, body)))
            if method == "DELETE":
                self.deleted.append(key)
                return 200, self.objects.pop(key)
        return 405, _status(405, "MethodNotAllowed", method)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replicas(obj: dict) -> tuple[list[tuple[dict, dict]], int, int]:
    """[(pod spec, container)] per node, nodes, processes per node, for a PyTorchJob or a TrainJob."""
    spec = obj["spec"]
    if obj["kind"] == "PyTorchJob":
        pods = []
        for role in ("Master", "Worker"):
            replica = spec["pytorchReplicaSpecs"].get(role)
            if replica:
                pod = replica["template"]["spec"]
                pods += [(pod, pod["containers"][0])] * replica["replicas"]
        return pods, len(pods), int(spec["nprocPerNode"])
    trainer = spec["trainer"]
    override = spec["podTemplateOverrides"][0]["spec"]
    container = {"command": trainer["command"], "env": trainer["env"], "volumeMounts": override["containers"][0]["volumeMounts"]}
    return [(override, container)] * trainer["numNodes"], trainer["numNodes"], trainer["numProcPerNode"]


def run_replicas_locally(api: KubeApi, obj: dict) -> None:
    """The training operator and kubelet: one local process per node, PET_* rendezvous on 127.0.0.1."""
    name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
    pods, nodes, per_node = _replicas(obj)
    folder = Path(tempfile.mkdtemp(prefix=f"kube-{name}-"))
    mounts: dict[str, str] = {}
    for volume in pods[0][0]["volumes"]:
        if "configMap" in volume:  # kubelet: the ConfigMap's keys become files
            local = folder / volume["name"]
            local.mkdir()
            for key, text in api.configmap_data(namespace, volume["configMap"]["name"]).items():
                (local / key).write_text(text)
            mounts[volume["name"]] = str(local)
    port = _free_port()
    processes = []
    for rank, (_, container) in enumerate(pods):
        env = {**os.environ, "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(per_node), "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        for item in container["env"]:
            value = item.get("value")
            if value is None:
                continue  # secretKeyRef: no Secrets here
            for mount in container["volumeMounts"]:
                if mount["name"] in mounts and value.startswith(mount["mountPath"]):
                    value = mounts[mount["name"]] + value[len(mount["mountPath"]) :]
            env[item["name"]] = value
        command = [sys.executable if c == "python" else c for c in container["command"]]  # the image's python
        log = open(folder / f"node-{rank}.log", "w")  # noqa: SIM115 (closed when the process ends)
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    with api.lock:
        set_condition(obj, "Running", "JobRunning", f"{obj['kind']} {name} is running.")
    codes = []
    for process, log in processes:
        codes.append(process.wait())
        log.close()
    api.logs[name] = "".join((folder / f"node-{rank}.log").read_text() for rank in range(nodes))
    with api.lock:
        if all(code == 0 for code in codes):
            done = "Succeeded" if obj["kind"] == "PyTorchJob" else "Complete"
            set_condition(obj, done, "JobSucceeded", f"{obj['kind']} {name} is successfully completed.")
        else:
            failed = sum(code != 0 for code in codes)
            set_condition(obj, "Failed", "JobFailed", f"{obj['kind']} {name} is failed because {failed} replica(s) failed.")


def scripted(*steps: tuple[float, str, str, str]) -> Callable[[KubeApi, dict], None]:
    """A controller that sets (after seconds, condition type, reason, message) in turn and runs nothing."""

    def controller(api: KubeApi, obj: dict) -> None:
        for delay, type_, reason, message in steps:
            time.sleep(delay)
            with api.lock:
                set_condition(obj, type_, reason, message)

    return controller


def _revision(obj: dict) -> str:
    return f"{obj['metadata']['name']}-predictor-{obj['metadata']['generation']:05d}"


def serving_ready(api: KubeApi, obj: dict) -> None:
    """KServe's controller in serverless mode where every revision comes up: the written spec's revision is created,
    ready and routed. Like KServe's own controller it sets no observedGeneration."""
    with api.lock:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        obj["status"] = {
            "url": f"http://{name}.{namespace}.example.com",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()} for t in ("PredictorReady", "Ready")],
            "components": {"predictor": {"latestCreatedRevision": _revision(obj), "latestReadyRevision": _revision(obj)}},
            "modelStatus": {
                "transitionStatus": "UpToDate",
                "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
            },
        }


def serving_blocked(reason: str, message: str) -> Controller:
    """KServe's controller where the written spec's model fails to load: its revision is created and fails, the one
    before it (if any) stays the ready one."""

    def controller(api: KubeApi, obj: dict) -> None:
        with api.lock:
            status = obj.setdefault("status", {})
            predictor = status.setdefault("components", {}).setdefault("predictor", {})
            predictor["latestCreatedRevision"] = _revision(obj)
            status["conditions"] = [{"type": "Ready", "status": "False", "reason": "RevisionFailed", "message": message}]
            status["modelStatus"] = {"transitionStatus": "BlockedByFailedLoad",
                                     "lastFailureInfo": {"reason": reason, "message": message}}  # fmt: skip

    return controller
