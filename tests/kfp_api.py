"""A KFP v2beta1 REST API on 127.0.0.1, as far as kfp.Client uses it: experiments, runs, recurring runs, healthz.

It keeps what it is sent, so tests assert on the requests a real KFP API server would receive.
No Kubeflow cluster can run on this machine; this is the server side of the wire protocol, not a mock of doctune.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from json_api import JsonApiServer

PREFIX = "/apis/v2beta1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KfpApi(JsonApiServer):
    def __init__(self, token: str | None = None):
        super().__init__()
        self.token = token
        self.requests: list[dict] = []  # {"method", "path", "query", "body", "headers" (lower-case names)}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}

    def sent(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == PREFIX + path]

    # -- the API ---------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict, headers: dict, body: dict) -> tuple[int, dict]:
        self.requests.append({"method": method, "path": path, "query": query, "body": body, "headers": headers})
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "unauthenticated", "code": 16, "message": "missing or bad token"}
        if not path.startswith(PREFIX):
            return 404, {"error": "not found", "code": 5, "message": "not found"}
        return self._route(method, path[len(PREFIX) :], query, body)

    def _route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        if path == "/healthz" and method == "GET":
            return 200, {"multi_user": False}
        if path == "/experiments" and method == "GET":
            wanted = None
            if "filter" in query:
                predicates = json.loads(query["filter"][0]).get("predicates", [])
                wanted = next((p.get("stringValue") or p.get("string_value") for p in predicates), None)
            found = [e for e in self.experiments.values() if wanted is None or e["display_name"] == wanted]
            return 200, {"experiments": found, "total_size": len(found)}
        if path == "/experiments" and method == "POST":
            experiment = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(), "storage_state": "AVAILABLE"}
            self.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if path == "/runs" and method == "POST":
            if "pipeline_spec" not in body or "experiment_id" not in body:
                return 400, {"error": "pipeline_spec and experiment_id are required", "code": 3, "message": "bad run"}
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": _now()}
            self.runs[run["run_id"]] = run
            return 200, run
        if path == "/runs" and method == "GET":
            runs = [r for r in self.runs.values() if r["experiment_id"] == query.get("experiment_id", [None])[0]]
            runs.sort(key=lambda r: r["created_at"], reverse="desc" in query.get("sort_by", [""])[0])
            size = int(query.get("page_size", ["10"])[0])
            return 200, {"runs": runs[:size], "total_size": len(runs)}
        if path == "/recurringruns" and method == "POST":
            job = {**body, "recurring_run_id": str(uuid.uuid4()), "status": "ENABLED", "created_at": _now()}
            self.recurring_runs[job["recurring_run_id"]] = job
            return 200, job
        return 404, {"error": f"no route {method} {path}", "code": 5, "message": "not found"}
