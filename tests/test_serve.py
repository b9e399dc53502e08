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
from pathlib import Path

import pytest

from doctune.artifacts import MODEL_KIND
from doctune.chat import rag_user_message
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


CHUNKS = [
    "To install a package, run apt install followed by the package name.",
    "The kernel boots from the partition marked active in the boot loader.",
    "Mount the installation media before copying the firmware files.",
]


def retrieval_outputs(run, work: Path) -> dict:
    """A retriever stage's outputs over CHUNKS: the chunks, a dense index with the bundled embedder, a model folder."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from doctune.records import CHUNKS_FILE, EMBEDDINGS_FILE, INDEX_FILE
    from doctune.retrieval import ChunkIndex

    chunks, index, model = work / "chunks", work / "index", work / "embedder"
    for folder in (chunks, index, model):
        folder.mkdir()
    rows = [{"chunk_id": f"doc-{n:04d}", "doc_id": "doc", "title": "Installer Guide", "page_start": n + 1,
             "page_end": n + 1, "char_start": 100 * n, "char_end": 100 * n + len(text), "n_tokens": 12,
             "section": f"Section {n}", "text": text}
            for n, text in enumerate(CHUNKS)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), chunks / CHUNKS_FILE)
    refs = {"chunks": run.log_output("retriever_chunks", chunks, kind="chunks")}
    vectors = ChunkIndex(CHUNKS, "bundled:all-minilm-l6-v2", work / "cache").vectors
    np.save(index / EMBEDDINGS_FILE, vectors)
    meta = {
        "retriever": "base",
        "mode": "dense",
        "embedder": "bundled:all-minilm-l6-v2",
        "chunk_ids": [r["chunk_id"] for r in rows],
        "chunks_digest": refs["chunks"].digest,
    }
    (index / INDEX_FILE).write_text(json.dumps(meta))
    (model / "README.md").write_text("the base embedder was selected: this folder is not read\n")
    refs["index"] = run.log_output("retriever_index", index, kind="chunk_index")
    refs["model"] = run.log_output("retriever_model", model, kind="embedding_model")
    return refs


def register(
    tracker: Tracker,
    config,
    folder_name: str,
    threshold: str = "-1.5",
    tokenizer: Path | None = None,
    retrieval: bool = False,
    sentences: dict[str, str] | None = None,
) -> str:
    """A registry version whose merged model carries the system prompt (and `tokenizer`'s files, where given) and
    whose gguf-q8_0 variant is the bundled SmolLM2 GGUF (llama.cpp serves it like any variant). Its abstention
    sentences are `sentences`, else one, tagged as versions gated before there were several."""
    work = config.project.workdir / folder_name
    model, variant = work / "model", work / "gguf-q8_0"
    if tokenizer is not None:
        shutil.copytree(tokenizer, model)
    model.mkdir(parents=True, exist_ok=True)
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
    tags = {"doctune.abstention_threshold.gguf-q8_0": threshold, "doctune.abstention_sentence": "Not in the documents."}
    if sentences is not None:
        tags = {"doctune.abstention_threshold.gguf-q8_0": threshold, registry.ABSTENTION_SENTENCES_TAG: json.dumps(sentences)}
    if retrieval:
        refs_ = retrieval_outputs(run, work)
        tags[registry.RETRIEVAL_TAG] = json.dumps({name: ref.to_dict() for name, ref in refs_.items()})
        tags[registry.PASSAGE_LABELS_TAG] = "true"
    run.finish(refs)
    return registry.register_candidate(tracker, refs["model"], {"gguf-q8_0": refs["gguf-q8_0"]}, tags)


@pytest.fixture
def served(make_config, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-planted-secret-123456")
    # The threshold is logged, not applied: these versions carry no tokenizer to score prompts with.
    settings = {"serve.port": 0, "serve.poll_seconds": 0.5, "serve.n_ctx": 2048, "serve.apply_abstention_threshold": False}
    config = make_config(**settings)
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
    with pytest.raises(ServeError, match="has an abstention threshold but its merged model holds no tokenizer"):
        Server(config.model_copy(update={"serve": config.serve.model_copy(update={"port": 0})}))
    with socket.socket() as taken:  # a port in use: one line, and no model server left behind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--set", f"project.workdir={config.project.workdir}"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """The served model's tokenizer and chat template, read from the GGUF as a merged model folder carries them."""
    from transformers import AutoTokenizer

    gguf = bundled_gguf("smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


def test_a_question_with_context_is_declined_where_its_abstention_score_reaches_the_threshold(make_config, smollm2_tokenizer):
    config = make_config(**{"serve.port": 0, "serve.poll_seconds": 0.3, "serve.n_ctx": 2048})
    tracker = Tracker(config)
    first = register(tracker, config, "first", threshold="0", tokenizer=smollm2_tokenizer)  # a mean log-prob is < 0
    registry.promote(tracker, first, reason="test")
    server = Server(config)
    server.start()
    try:
        url = f"{server.url}/v1/chat/completions"
        passages = ["Packages are installed with apt install followed by the package name."]
        asked = {"messages": [{"role": "user", "content": rag_user_message("Who painted the Mona Lisa?", passages)}],
                 "max_tokens": 8}  # fmt: skip
        status, answered, _ = post(url, asked)
        score = answered["doctune"]["abstention_score"]
        assert status == 200 and answered["doctune"]["declined"] is False and score < 0
        assert answered["choices"][0]["message"]["content"] != "Not in the documents."
        # A question without context is not scored: the threshold was calibrated on RAG prompts.
        plain = {"messages": [{"role": "user", "content": "How do I install a package?"}], "max_tokens": 8}
        assert "abstention_score" not in post(url, plain)[1]["doctune"]
        # A context too long to score is one explained line, and the server goes on.
        long = {"messages": [{"role": "user", "content": rag_user_message("Why?", ["word " * 3000])}]}
        status, refused, _ = post(url, long)
        assert status == 400 and "over serve.n_ctx 2048" in refused["error"]["message"]
        # A version whose threshold the same prompt's score reaches: declined with the gate's sentence, not generated.
        sentences = {"en": "Not in the documents.", "es": "No está en los documentos."}
        threshold = str(score - 1e-3)
        second = register(tracker, config, "second", threshold=threshold, tokenizer=smollm2_tokenizer, sentences=sentences)
        registry.promote(tracker, second, reason="test")
        deadline = time.monotonic() + 120
        while server.backend.deployment.version != second and time.monotonic() < deadline:
            time.sleep(0.3)
        status, declined, _ = post(url, asked)
        assert status == 200 and declined["doctune"]["model_version"] == second and declined["doctune"]["declined"] is True
        assert declined["choices"][0]["message"]["content"] == "Not in the documents."
        assert declined["doctune"]["reply_lang"] == "en"  # the language of the passages the client sent
        assert declined["doctune"]["abstention_score"] == pytest.approx(score, abs=1e-4)  # the same prompt, the same score
        assert post(url, plain)[1]["choices"][0]["message"]["content"] != "Not in the documents."
        records = [json.loads(line) for line in (config.project.workdir / "serving" / "requests.jsonl").read_text().splitlines()]
        assert [r.get("declined") for r in records] == [False, None, None, True, None]
    finally:
        server.close()


def test_a_request_declines_in_the_language_of_its_passages():
    from doctune.langid import passages_language
    from doctune.serve import abstention_sentences, context_language

    sentences = {"en": "Not in the documents.", "de": "Steht nicht in den Unterlagen."}
    assert abstention_sentences({registry.ABSTENTION_SENTENCES_TAG: json.dumps(sentences)}) == sentences
    # A version gated before there were several sentences: its one sentence, as English.
    assert abstention_sentences({registry.LEGACY_ABSTENTION_SENTENCE_TAG: "No."}) == {"en": "No."}
    with pytest.raises(ServeError, match="JSON object of language"):
        abstention_sentences({registry.ABSTENTION_SENTENCES_TAG: "Not in the documents."})
    # Context the client sent: each passage detected, the most common language, as the gate picks it for its items.
    german = "Die Pumpe fördert das Wasser mit einem Druck von zwei bar in den Behälter, der über dem Keller steht."
    english = "The pump moves the water at a pressure of two bar into the tank that stands above the cellar floor."
    long_english = english * 30  # one long passage does not outvote two short ones
    assert context_language(rag_user_message("Wie hoch ist der Druck?", [long_english, german, german])) == "de"
    assert context_language(rag_user_message("What is the pressure?", [english, german])) == "en"  # a tie: the first
    # Retrieved chunks (and the gate's items): the recorded language where a chunk carries one, else its text's.
    assert passages_language(["de", None, "und", "en"], [english, german, german, german]) == "de"


def test_a_question_without_context_gets_the_indexed_passages_and_their_citations(make_config):
    config = make_config(**{"serve.port": 0, "serve.apply_abstention_threshold": False, "retrieval.top_k": 2})
    tracker = Tracker(config)
    first = register(tracker, config, "first", retrieval=True)
    registry.promote(tracker, first, reason="test")
    server = Server(config)
    server.start()
    try:
        url = f"{server.url}/v1/chat/completions"
        question = "Which partition does the kernel boot from?"
        status, reply, _ = post(url, {"messages": [{"role": "user", "content": question}], "max_tokens": 8})
        citations = reply["doctune"]["citations"]
        assert status == 200 and reply["doctune"]["retriever"] == "base" and len(citations) == 2
        assert [c["label"] for c in citations] == [1, 2]
        best = max(citations, key=lambda c: c["score"])
        assert best["chunk_id"] == "doc-0001" and best["label"] == 1  # the best passage comes first in the prompt
        assert (best["page_start"], best["char_start"], best["char_end"]) == (2, 100, 100 + len(CHUNKS[1]))
        assert best["source"] == "Installer Guide, p. 2" and best["title"] == "Installer Guide"
        text = reply["choices"][0]["message"]["content"]
        assert [c["cited"] for c in citations] == [f"[{c['label']}]" in text for c in citations]
        record = json.loads((config.project.workdir / "serving" / "requests.jsonl").read_text().splitlines()[-1])
        sent = record["messages"][-1]["content"]
        assert sent.startswith("Context:\n[1] Installer Guide, p. 2\n" + CHUNKS[1]) and sent.endswith(f"Question: {question}")
        assert record["retrieved"] == [c["chunk_id"] for c in citations]
        # A client that sends its own context is answered on it: nothing retrieved, nothing cited.
        own = {"messages": [{"role": "user", "content": "Context:\n[1] Nothing here.\n\nQuestion: Why?"}], "max_tokens": 4}
        assert "citations" not in post(url, own)[1]["doctune"]
    finally:
        server.close()
