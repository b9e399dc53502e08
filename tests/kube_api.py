"""An in-process Kubernetes API emulator on 127.0.0.1: ConfigMaps and Kubeflow training jobs (PyTorchJob, TrainJob).

No Kubernetes API server can run on this machine. This serves the REST paths the `kubernetes` client calls for
those objects, and a controller stands in for the training operator and kubelet: it runs each replica's
container command as a local process with the PET_* variables the operator sets (so torchrun forms a real
multi-node group on 127.0.0.1), mounts ConfigMap volumes as local folders, and reports Created, Running and
Succeeded or Failed conditions on the job. A test may pass its own controller to script other outcomes.
"""

from __future__ import annotations

import json
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

CUSTOM = {("kubeflow.org", "v1", "pytorchjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainjobs")}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(obj: dict, type_: str, reason: str, message: str = "") -> None:
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    for condition in conditions:
        if condition["type"] != type_:
            condition["status"] = "False"
    conditions.append({"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": _now()})


class KubeApi(JsonApiServer):
    def __init__(self, controller: Callable[[KubeApi, dict], None] | None = None):
        super().__init__()
        self.objects: dict[tuple[str, str, str], dict] = {}  # (resource, namespace, name) -> object
        self.deleted: list[tuple[str, str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.controller = controller or run_replicas_locally
        self.lock = threading.Lock()
        self.logs: dict[str, str] = {}

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
                                            "creationTimestamp": _now()}}  # fmt: skip
                self.objects[key] = obj
                if resource in {r for _, _, r in CUSTOM}:
                    set_condition(obj, "Created", "JobCreated", f"{obj['kind']} {name} is created.")
                    threading.Thread(target=self.controller, args=(self, obj), daemon=True).start()
                return 201, obj
            key = (resource, namespace, name)
            if key not in self.objects:
                return 404, _status(404, "NotFound", f'{resource} "{name}" not found')
            if method == "GET":
                return 200, json.loads(json.dumps(self.objects[key]))
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
