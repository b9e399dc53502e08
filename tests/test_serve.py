"""`doctune serve` with a real llama.cpp server behind it: the champion served with its system prompt, every request
logged with secrets and e-mail addresses redacted, feedback joined by request id, the alias followed without
dropping a request in flight, and bad requests answered with one explained line."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from doctune.artifacts import MODEL_KIND
from doctune.gate import registry
from doctune.models import bundled_gguf
from doctune.serve import ServeError, Server, resolve
from doctune.tracking import Tracker

SYSTEM_PROMPT = "You are the documentation assistant of the test suite."


def post(url: str, body, timeout: float = 120) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def register(tracker: Tracker, config, folder_name: str) -> str:
    """A registry version whose merged model carries the system prompt and whose gguf-q8_0 variant is the bundled
    SmolLM2 GGUF (llama.cpp serves it like any variant)."""
    work = config.project.workdir / folder_name
    model, variant = work / "model", work / "gguf-q8_0"
    model.mkdir(parents=True)
    variant.mkdir()
    (model / "system_prompt.txt").write_text(SYSTEM_PROMPT + "\n")
    (model / "config.json").write_text("{}")
    shutil.copy(bundled_gguf("smollm2-135m-instruct"), variant / "model-q8_0.gguf")
    parent = tracker.open_pipeline_run(folder_name)
    run = tracker.start_stage_run("quantize", parent, {})
    refs = {
        "model": run.log_output("model", model, kind=MODEL_KIND),
        "gguf-q8_0": run.log_output("gguf-q8_0", variant, kind="gguf"),
    }
    run.finish(refs)
    tags = {"doctune.abstention_threshold.gguf-q8_0": "-1.5"}
    return registry.register_candidate(tracker, refs["model"], {"gguf-q8_0": refs["gguf-q8_0"]}, tags)


@pytest.fixture
def served(make_config, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-planted-secret-123456")
    config = make_config(**{"serve.port": 0, "serve.poll_seconds": 0.5, "serve.n_ctx": 2048})
    tracker = Tracker(config)
    first = register(tracker, config, "first")
    registry.promote(tracker, first, reason="test")
    server = Server(config)
    server.start()
    yield config, tracker, server, first
    server.close()


def test_the_champion_is_served_logged_redacted_and_rated(served):
    _, _, server, first = served
    url = server.url
    question = "Write to admin@example.com with key sk-test-planted-secret-123456: how do I install a package?"
    status, reply, headers = post(
        f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": question}], "max_tokens": 16}
    )
    assert status == 200 and reply["choices"][0]["message"]["content"]
    request_id = reply["doctune"]["request_id"]
    assert headers["X-Request-Id"] == request_id and reply["doctune"]["model_version"] == first

    (record,) = [json.loads(line) for line in (server.log_dir / "requests.jsonl").read_text().splitlines()]
    assert record["request_id"] == request_id and record["model_version"] == first and record["variant"] == "gguf-q8_0"
    assert record["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}  # added: the client sent none
    assert record["response"] == reply["choices"][0]["message"]["content"] or "[redacted" in record["response"]
    assert record["usage"]["completion_tokens"] > 0 and record["latency_s"] > 0
    assert record["abstention_threshold"] == "-1.5"
    logged = (server.log_dir / "requests.jsonl").read_text()
    assert "admin@example.com" not in logged and "sk-test-planted-secret-123456" not in logged
    assert "[redacted:pii]" in logged and "[redacted:OPENAI_API_KEY]" in logged

    # A client's own system prompt is kept as sent.
    own = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]
    assert post(f"{url}/v1/chat/completions", {"messages": own, "max_tokens": 4})[0] == 200
    last = json.loads((server.log_dir / "requests.jsonl").read_text().splitlines()[-1])
    assert last["messages"] == own

    status, body, _ = post(f"{url}/feedback", {"request_id": request_id, "rating": "down", "correction": "Use apt install."})
    assert status == 200 and body == {"ok": True}
    (feedback,) = [json.loads(line) for line in (server.log_dir / "feedback.jsonl").read_text().splitlines()]
    assert feedback["request_id"] == request_id and feedback["rating"] == "down" and feedback["model_version"] == first

    # Bad requests: one explained line each, nothing logged.
    assert post(f"{url}/v1/chat/completions", b"{not json")[:2][0] == 400
    status, body, _ = post(f"{url}/v1/chat/completions", {"messages": []})
    assert status == 400 and "non-empty list" in body["error"]["message"]
    status, body, _ = post(f"{url}/feedback", {"request_id": "unknown", "rating": "up"})
    assert status == 404 and "was not served" in body["error"]["message"]
    assert post(f"{url}/feedback", {"request_id": request_id, "rating": "meh"})[0] == 400
    assert len((server.log_dir / "requests.jsonl").read_text().splitlines()) == 2


def test_a_moved_alias_is_served_without_dropping_a_request_in_flight(served):
    config, tracker, server, _ = served
    url = server.url
    second = register(tracker, config, "second")
    results = {}

    def long_request():  # the end-of-turn token (id 2) barred: it runs its 400 tokens
        body = {"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}], "max_tokens": 400,
                "logit_bias": {"2": -100}}  # fmt: skip
        results["in_flight"] = post(f"{url}/v1/chat/completions", body, timeout=600)

    old = server.backend
    worker = threading.Thread(target=long_request)
    worker.start()
    while old.in_flight == 0:
        time.sleep(0.05)
    registry.promote(tracker, second, reason="test")
    assert server.check_alias()  # the follower thread would do the same within serve.poll_seconds
    assert server.backend is not old and old.in_flight == 1  # switched while the old server still answers
    worker.join(timeout=600)
    assert old.process.wait(timeout=60) is not None  # and it stops once it has answered
    status, reply, _ = results["in_flight"]
    assert status == 200 and reply["choices"][0]["message"]["content"]
    assert json.loads(urllib.request.urlopen(f"{url}/health").read())["model_version"] == second
    status, reply, _ = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200 and reply["doctune"]["model_version"] == second
    assert not server.check_alias()  # nothing moved since


def test_nothing_to_serve_is_one_explained_line(make_config, capsys):
    from doctune_kfp.pipelines.cli import main

    config = make_config()
    tracker = Tracker(config)
    with pytest.raises(ServeError, match="has no version aliased 'champion'"):
        resolve(tracker, "champion", "gguf-q8_0")
    assert main(["serve", "--set", f"project.workdir={config.project.workdir}"]) == 2
    assert "error: registered model" in capsys.readouterr().err
    first = register(tracker, config, "first")
    registry.promote(tracker, first, reason="test")
    with pytest.raises(ServeError, match="has no variant 'nf4' \\(it has: gguf-q8_0\\)"):
        resolve(tracker, "champion", "nf4")
    with socket.socket() as taken:  # a port in use: one line, and no model server left behind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--set", f"project.workdir={config.project.workdir}"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
