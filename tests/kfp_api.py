"""A KFP v2beta1 REST API on 127.0.0.1, as far as kfp.Client uses it: experiments, runs, recurring runs, healthz.

It keeps what it is sent, so tests assert on the requests a real KFP API server would receive.
No Kubeflow cluster can run on this machine; this is the server side of the wire protocol, not a mock of doctune.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/v2beta1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KfpApi:
    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[dict] = []  # {"method", "path", "query", "body", "headers" (lower-case names)}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> KfpApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sent(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == PREFIX + path]

    # -- the API ---------------------------------------------------------------

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

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet test output
                pass

            def _serve(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                query = parse_qs(url.query)
                api.requests.append({"method": method, "path": url.path, "query": query, "body": body,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}})  # fmt: skip
                if api.token and self.headers.get("Authorization") != f"Bearer {api.token}":
                    status, reply = 401, {"error": "unauthenticated", "code": 16, "message": "missing or bad token"}
                elif not url.path.startswith(PREFIX):
                    status, reply = 404, {"error": "not found", "code": 5, "message": "not found"}
                else:
                    status, reply = api._route(method, url.path[len(PREFIX) :], query, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

        return Handler
