"""Nothing trusted blindly: a secret echoed back by a server is stored nowhere, and a refused key is not retried."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from doctune import endpoint as endpoint_module
from doctune.config import EndpointConfig
from doctune.endpoint import ChatClient, EndpointError
from doctune.redact import configure, protect, redact, redact_obj, secret_names
from doctune.stages import execute_stage
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main

PLANTED = "sk-test-PLANTED-0123456789"


class _EchoingEndpoint:
    """A real HTTP server on 127.0.0.1 answering each POST with `statuses` in turn (the last one repeats); a refusal
    echoes the Authorization header's key in its JSON body, as careless gateways do."""

    def __init__(self, *statuses: int):
        self.statuses = statuses
        self.keys: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                auth = self.headers.get("Authorization")
                outer.keys.append(auth)
                status = outer.statuses[min(len(outer.keys), len(outer.statuses)) - 1]
                if status == 200:
                    content = json.dumps({"questions": [{"question": "What is echoed here?", "answer": "nothing"}]})
                    body = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                else:
                    key = (auth or "").removeprefix("Bearer ")
                    body = {"error": {"message": f"Incorrect API key provided: {key}", "header": auth, "code": status}}
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    started = []

    def start(*statuses: int) -> _EchoingEndpoint:
        started.append(_EchoingEndpoint(*statuses))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.mark.faults
def test_redact_replaces_secret_values_uri_passwords_and_bearer_tokens(monkeypatch):
    monkeypatch.setenv("DOCTUNE_TEACHER_API_KEY", PLANTED)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "abc")  # too short to replace safely
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "doctune")  # an identity, not a secret
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter22\n")  # as read from a secret file
    configure()
    assert redact(f"401: bad key {PLANTED}!") == "401: bad key [redacted:DOCTUNE_TEACHER_API_KEY]!"
    assert redact("pw=hunter22 abc doctune") == "pw=[redacted:MLFLOW_TRACKING_PASSWORD] abc doctune"
    assert (
        redact("sqlite:///x.db and postgresql://mlflow:s3cr3t-pw@db:5432/mlflow and http://127.0.0.1:5000/api")
        == "sqlite:///x.db and postgresql://mlflow:***@db:5432/mlflow and http://127.0.0.1:5000/api"
    )
    assert redact("Authorization: Bearer abcdefgh12345678") == "Authorization: Bearer ***"
    assert redact("") == "" and redact("no secrets here") == "no secrets here"
    assert redact_obj({"replies": [f"key {PLANTED}"], "n": 2}) == {"replies": ["key [redacted:DOCTUNE_TEACHER_API_KEY]"], "n": 2}
    # A value set after configuration is still caught: values are read at each call.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    assert redact("s=wJalrXUtnFEMI/K7MDENG") == "s=[redacted:AWS_SECRET_ACCESS_KEY]"


@pytest.mark.faults
def test_secret_names_follow_the_config(make_config, monkeypatch):
    config = make_config(**{"synth.endpoint.api_key_env": "MY_GATEWAY_KEY"})
    config.cluster.secrets[0].env["extra"] = "MY_ODD_SECRET"
    names = secret_names(config)
    assert {"MY_GATEWAY_KEY", "MY_ODD_SECRET", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY"} <= names
    assert "DOCTUNE_TEACHER_API_KEY" in names  # still the standard name, and the default Secret's variable
    assert "MLFLOW_TRACKING_USERNAME" not in names
    monkeypatch.setenv("MY_ODD_SECRET", "odd-value-42")
    assert "odd-value-42" in redact("odd-value-42")  # not configured yet
    Tracker(config)  # loading a run's tracker configures redaction from its config
    assert redact("odd-value-42") == "[redacted:MY_ODD_SECRET]"
    protect("ANOTHER_KEY")
    monkeypatch.setenv("ANOTHER_KEY", "another-value")
    assert redact("another-value") == "[redacted:ANOTHER_KEY]"


def _client(url: str, **endpoint) -> ChatClient:
    return ChatClient(EndpointConfig(**{"base_url": url, "max_retries": 3, "timeout_s": 5, **endpoint}))


@pytest.mark.faults
def test_refusals_are_not_retried_and_attempts_are_counted(endpoint, monkeypatch):
    monkeypatch.setattr(endpoint_module.time, "sleep", lambda s: None)
    monkeypatch.setenv("DOCTUNE_TEACHER_API_KEY", PLANTED)
    for status in (401, 403, 400, 404, 422):
        server = endpoint(status)
        with pytest.raises(EndpointError) as caught:
            _client(server.url).complete("s", "u", {})
        message = str(caught.value)
        assert f"refused the request: HTTP {status}" in message and "after 1 attempt" in message, message
        assert len(server.keys) == 1 and PLANTED not in message
    refused = endpoint(401)
    with pytest.raises(EndpointError, match=r"HTTP 401 \(check the key in \$DOCTUNE_TEACHER_API_KEY\), after 1 attempt:"):
        _client(refused.url).complete("s", "u", {})
    assert "[redacted:DOCTUNE_TEACHER_API_KEY]" in str(_refusal(refused.url))

    monkeypatch.delenv("DOCTUNE_TEACHER_API_KEY")
    anonymous = endpoint(401)
    with pytest.raises(EndpointError, match=r"HTTP 401 \(no key sent: \$DOCTUNE_TEACHER_API_KEY is not set\)"):
        _client(anonymous.url).complete("s", "u", {})
    assert anonymous.keys == [None]

    # Rate limiting and request timeouts are retried, and a success ends it.
    limited = endpoint(429, 408, 200)
    assert "questions" in _client(limited.url).complete("s", "u", {})
    assert len(limited.keys) == 3
    # A server that stays down: the real number of attempts, singular when there was one.
    down = endpoint(503)
    with pytest.raises(EndpointError, match=r"failed after 4 attempts: HTTP 503"):
        _client(down.url).complete("s", "u", {})
    assert len(down.keys) == 4
    once = endpoint(503)
    with pytest.raises(EndpointError, match=r"failed after 1 attempt: HTTP 503"):
        _client(once.url, max_retries=0).complete("s", "u", {})


def _refusal(url: str) -> EndpointError:
    try:
        _client(url).complete("s", "u", {})
    except EndpointError as exc:
        return exc
    raise AssertionError("the endpoint did not refuse")


@pytest.mark.faults
def test_an_endpoint_echoing_the_key_leaves_no_secret_anywhere(
    make_config, small_corpus, endpoint, monkeypatch, capsys, tmp_path
):
    """`doctune stage synth` against a server that answers 401 with the key in its body: one error line naming the
    cause, one request, and the key in no output, no file of the work directory and no tracking-store field."""
    monkeypatch.setenv("DOCTUNE_TEACHER_API_KEY", PLANTED)
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("secrets-test")
    execute_stage("ingest", config, tracker, parent, {})
    server = endpoint(401)

    settings = {
        "project.workdir": config.project.workdir, "model.base_model": config.model.base_model,
        "synth.teacher": "endpoint", "synth.endpoint.base_url": server.url, "synth.replay.share": 0,
    }  # fmt: skip
    args = ["stage", "synth", "--from-run", parent]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    code = main(args)
    out, err = capsys.readouterr()

    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "HTTP 401" in errors[0] and "after 1 attempt" in errors[0] and "$DOCTUNE_TEACHER_API_KEY" in errors[0]
    assert f"{server.url}/chat/completions refused the request" in errors[0]
    assert "Traceback" not in out + err
    assert server.keys == [f"Bearer {PLANTED}"]  # sent once: a refused key is not retried, nor sent per chunk
    assert PLANTED not in out + err

    # The tracking store: the failed synth run says why, with the echo redacted.
    client = tracker.client
    runs = client.search_runs([tracker.experiment_id], max_results=1000)
    (synth,) = [r for r in runs if r.data.tags.get("doctune.stage") == "synth"]
    assert synth.info.status == "FAILED"
    assert "HTTP 401" in synth.data.tags["doctune.error"]
    assert "[redacted:DOCTUNE_TEACHER_API_KEY]" in synth.data.tags["doctune.error"]  # the echo was there
    for run in runs:
        fields = {**run.data.tags, **run.data.params, "name": run.info.run_name or ""}
        leaked = [key for key, value in fields.items() if PLANTED in str(value)]
        assert leaked == [], (run.info.run_id, leaked)

    # Every file under the test's folder: the work directory (mlflow.db, artifacts, cache, checkpoints) and around it.
    planted = PLANTED.encode()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "mlflow.db" for path in files)
    leaked_files = [str(path) for path in files if planted in path.read_bytes()]
    assert leaked_files == []
