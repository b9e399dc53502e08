"""`doctune serve`: a registry alias (the champion) behind llama.cpp's OpenAI-compatible server.

The front server resolves the alias, verifies the variant's artifact against its digest, starts llama.cpp's server
on a private port and forwards /v1/chat/completions to it, with the model's own system prompt added where the
client sends none. Every request is logged (request id, model version, prompt, response, latency, token counts)
to an append-only JSONL file, rotated by size, with secrets and configured PII patterns redacted; POST /feedback
joins a rating or a correction by request id. (The flywheel's own self-consistency samples, marked in their
`metadata`, are answered but not logged.) The alias is followed: when it moves, a new llama.cpp server is
started for the new version and takes the next requests; the old one finishes the requests it has, then stops.

The gate's abstention threshold is applied (`serve.apply_abstention_threshold`): a request whose question comes
with retrieved context ("Context:" first in its user turn, as the model was trained and gated) is scored first, the
mean log-probability of the abstention sentence as the reply, the gate's own score; where it reaches the version's
threshold the server answers with that sentence instead of generating. The sentence is in the language of the
passages (the retrieved chunks' recorded language, else the one detected in each passage sent), as the gate picks
it. Requests without context are not scored: the threshold was calibrated on RAG prompts only.

Retrieval (`serve.retrieve`): where the version was gated with the retriever stage's index, a question sent
without context gets the `retrieval.top_k` best passages of that index, in the RAG prompt the model was trained
on, and the reply names them as citations (chunk, document title, pages, character span, whether the reply cites it)
beside the text.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mlflow.exceptions import MlflowException

from doctune.artifacts import ArtifactRef
from doctune.chat import (
    ABSTENTION,
    abstention_in,
    carries_context,
    context_passages,
    edge_order,
    rag_user_message,
    reply_sequences,
)
from doctune.citations import chunk_label, chunk_passage, cited_numbers
from doctune.config import RunConfig
from doctune.flywheel import SELF_CONSISTENCY
from doctune.gate import registry
from doctune.langid import passages_language
from doctune.langid import warm_up as warm_up_language_detection
from doctune.records import CHUNKS_FILE, EMBEDDINGS_FILE, INDEX_FILE, read_parquet
from doctune.redact import scrub
from doctune.tracking import Tracker

SYSTEM_PROMPT_FILE = "system_prompt.txt"
MAX_BODY = 8 * 2**20  # a request body larger than this is refused
CITED_FIELDS = ("chunk_id", "doc_id", "title", "section", "lang", "page_start", "page_end", "char_start", "char_end")


class ServeError(RuntimeError):
    """Nothing to serve, or a server that cannot start: one explained line."""


@dataclass(frozen=True)
class Deployment:
    """One registry version's variant, as served."""

    version: str
    variant: str
    gguf: Path
    system_prompt: str
    abstention_threshold: str  # the gate's tag, recorded with each logged request ("" where the gate set none)
    abstentions: dict[str, str]  # language -> the sentence the threshold was scored on, the reply of a declined request
    model_folder: Path  # the merged model: its tokenizer renders the prompts the threshold is applied to
    retrieval: dict[str, tuple[ArtifactRef, Path]] | None  # index, model, chunks: (ref, fetched folder); None: no index
    labelled: bool = True  # passages shown as `[n] <title>, p. X`; versions gated before labels existed saw bare text


def threshold_number(tag: str) -> float | None:
    """The gate's threshold tag as a number: "never" +inf, "always" -inf, "" (no threshold set) None."""
    if not tag:
        return None
    named = {"never": math.inf, "always": -math.inf}
    try:
        return named[tag] if tag in named else float(tag)
    except ValueError:
        raise ServeError(f"abstention threshold tag {tag!r} is not a number, 'never' or 'always'") from None


def resolve(tracker: Tracker, alias: str, variant: str, retrieve: bool = True, pinned: str | None = None) -> Deployment:
    """The version an alias points at (or the `pinned` version), its variant (and, with `retrieve`, its retrieval
    index) fetched and verified against its digest."""
    if pinned is not None:
        try:
            version = tracker.client.get_model_version(registry.model_name(tracker), pinned)
        except MlflowException:
            raise ServeError(
                f"registered model {registry.model_name(tracker)!r} has no version {pinned} (serve.version)"
            ) from None
    else:
        version = registry.version_by_alias(tracker, alias)
    if version is None:
        raise ServeError(
            f"registered model {registry.model_name(tracker)!r} has no version aliased {alias!r}: run the pipeline "
            "until a candidate is promoted, or `doctune promote <version>`"
        )
    variants, variant = registry.variants_of(version, variant)
    if variant not in variants:
        have = ", ".join(sorted(variants)) or "none"
        raise ServeError(f"version {version.version} ({alias}) has no variant {variant!r} (it has: {have}); set serve.variant")
    folder = tracker.fetch(ArtifactRef.from_dict(variants[variant]))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ServeError(
            f"variant {variant!r} of version {version.version} holds no GGUF file: serve a gguf-* variant (llama.cpp "
            "serves GGUF only; transformers checkpoints such as nf4 are not served by doctune serve)"
        )
    model = tracker.fetch(ArtifactRef.from_dict(json.loads(version.tags[registry.MODEL_TAG])))
    prompt_file = model / SYSTEM_PROMPT_FILE
    system_prompt = prompt_file.read_text().strip() if prompt_file.is_file() else ""
    threshold = version.tags.get(f"{registry.ABSTENTION_THRESHOLD_TAG}.{variant}", "")
    threshold_number(threshold)  # a malformed tag stops here, before a server starts
    abstentions = abstention_sentences(version.tags)
    retrieval = None
    if retrieve and registry.RETRIEVAL_TAG in version.tags:
        refs = {name: ArtifactRef.from_dict(ref) for name, ref in json.loads(version.tags[registry.RETRIEVAL_TAG]).items()}
        retrieval = {name: (ref, tracker.fetch(ref)) for name, ref in refs.items()}
    labelled = version.tags.get(registry.PASSAGE_LABELS_TAG) == "true"
    return Deployment(str(version.version), variant, ggufs[0], system_prompt, threshold, abstentions, model, retrieval, labelled)


def abstention_sentences(tags: dict[str, str]) -> dict[str, str]:
    """The abstention sentences a version was gated with, by language (a version gated before there were several:
    its one sentence, as English)."""
    if registry.ABSTENTION_SENTENCES_TAG in tags:
        try:
            sentences = json.loads(tags[registry.ABSTENTION_SENTENCES_TAG])
        except json.JSONDecodeError:
            sentences = None
        if not isinstance(sentences, dict) or not sentences or not all(isinstance(v, str) and v for v in sentences.values()):
            raise ServeError(f"tag {registry.ABSTENTION_SENTENCES_TAG} must be a JSON object of language -> sentence")
        return sentences
    return {"en": tags.get(registry.LEGACY_ABSTENTION_SENTENCE_TAG) or ABSTENTION}


def context_language(user_text: str) -> str:
    """The language of the passages a client sent in its RAG user turn, picked as the gate picks it for its items:
    each passage's detected language, the most common (the first passage's on a tie)."""
    passages = context_passages(user_text)
    return passages_language([None] * len(passages), passages)


class Retriever:
    """The retriever stage's selected index over the chunks, as the version was gated with it."""

    def __init__(self, retrieval: dict[str, tuple[ArtifactRef, Path]], top_k: int, cache_dir: Path, labelled: bool = True):
        import numpy as np

        from doctune.retrieval import ChunkIndex

        refs = {name: ref for name, (ref, _) in retrieval.items()}
        folders = {name: folder for name, (_, folder) in retrieval.items()}
        meta = json.loads((folders["index"] / INDEX_FILE).read_text())
        if meta.get("chunks_digest") != refs["chunks"].digest:
            raise ServeError(
                f"the retrieval index was built on chunks {meta.get('chunks_digest')}, the version names {refs['chunks'].digest}"
            )
        by_id = {c["chunk_id"]: c for c in read_parquet(folders["chunks"] / CHUNKS_FILE)}
        missing = [cid for cid in meta["chunk_ids"] if cid not in by_id]
        if missing:
            raise ServeError(f"the retrieval index names {len(missing)} chunk(s) its chunks artifact lacks, e.g. {missing[0]}")
        self.chunks = [by_id[cid] for cid in meta["chunk_ids"]]
        embedder = str(folders["model"]) if meta["embedder"] == "model" else meta["embedder"]
        vectors = np.load(folders["index"] / EMBEDDINGS_FILE)
        texts = [c["text"] for c in self.chunks]
        self.index = ChunkIndex(texts, embedder, cache_dir, mode=meta["mode"], vectors=vectors, cache_queries=False)
        self.name, self.top_k, self.labelled = meta["retriever"], top_k, labelled
        self.lock = threading.Lock()  # the embedder and BM25 are not shared across threads

    def context(self, question: str) -> tuple[str, list[dict], str]:
        """The RAG user turn for a question, its passages as citations in the order the prompt numbers them, and
        their language (as the gate picks it: the chunks' recorded language, else detected, the most common)."""
        with self.lock:
            top, scores = self.index.search([question], self.top_k)
        ranked = [(self.chunks[int(i)], float(score)) for i, score in zip(top[0], scores[0])]
        ordered = edge_order(ranked)
        citations = [
            {"label": n, "source": chunk_label(chunk), "score": round(score, 6), **{k: chunk.get(k) for k in CITED_FIELDS}}
            for n, (chunk, score) in enumerate(ordered, start=1)
        ]  # fmt: skip
        shown = [chunk_passage(chunk) if self.labelled else chunk["text"] for chunk, _ in ordered]
        lang = passages_language([chunk.get("lang") for chunk, _ in ordered], [chunk["text"] for chunk, _ in ordered])
        return rag_user_message(question, shown), citations, lang


class Decliner:
    """The gate's abstention threshold at serving: scores a prompt as the gate did (the abstention sentence's mean
    token log-probability as the reply, rendered with the merged model's tokenizer, computed by llama.cpp on the
    served GGUF) and says whether it reaches the threshold."""

    def __init__(self, deployment: Deployment, n_ctx: int):
        from transformers import AutoTokenizer

        from doctune.runtimes import LlamaCppRuntime

        self.threshold = threshold_number(deployment.abstention_threshold)
        self.sentences = deployment.abstentions
        warm_up_language_detection()  # before requests on several threads ask langdetect at once
        if not (deployment.model_folder / "tokenizer_config.json").is_file():
            raise ServeError(
                f"version {deployment.version} has an abstention threshold but its merged model holds no tokenizer to "
                "score prompts with; set serve.apply_abstention_threshold=false to serve it without the threshold"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(deployment.model_folder)
        self.runtime = LlamaCppRuntime(deployment.gguf, n_ctx=n_ctx, chat=False)
        self.lock = threading.Lock()  # one llama.cpp context: one score at a time

    def score(self, messages: list[dict], lang: str) -> float:
        """The mean log-probability of the abstention sentence in `lang` as the reply to `messages`."""
        (sequence,) = reply_sequences(self.tokenizer, [messages], [abstention_in(lang, self.sentences)])
        if len(sequence[0]) > self.runtime.n_ctx:
            raise ValueError(f"{len(sequence[0])} tokens with the abstention sentence, over serve.n_ctx {self.runtime.n_ctx}")
        with self.lock:
            return self.runtime.continuation_logprobs([sequence])[0]

    def close(self) -> None:
        with self.lock:
            self.runtime.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend:
    """A llama.cpp server process for one deployment, with the count of requests it is answering."""

    def __init__(self, deployment: Deployment, config: RunConfig, log_dir: Path):
        serve, n_ctx = config.serve, config.serve.n_ctx
        self.deployment = deployment
        threshold = threshold_number(deployment.abstention_threshold) if serve.apply_abstention_threshold else None
        self.decliner = self.retriever = None
        try:
            if threshold is not None and threshold != math.inf:  # "never" declines nothing: no need to score
                self.decliner = Decliner(deployment, n_ctx)
            if serve.retrieve and deployment.retrieval is not None:
                self.retriever = Retriever(
                    deployment.retrieval, config.retrieval.top_k, config.project.workdir / "cache", deployment.labelled
                )
        except Exception as exc:
            if self.decliner is not None:
                self.decliner.close()
            if isinstance(exc, ServeError):
                raise
            raise ServeError(f"version {deployment.version} cannot be served: {type(exc).__name__}: {exc}") from exc
        startup_timeout_s = serve.startup_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.in_flight = 0
        self.idle = threading.Condition()
        log = log_dir / f"llama-server-v{deployment.version}.log"
        command = [sys.executable, "-m", "doctune.llama_server", "--model", str(deployment.gguf), "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_ctx", str(n_ctx), "--model_alias", f"v{deployment.version}"]  # fmt: skip
        if serve.threads:
            command += ["--n_threads", str(serve.threads), "--n_threads_batch", str(serve.threads)]
        with open(log, "a") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout_s
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                if self.decliner is not None:
                    self.decliner.close()
                tail = log.read_text(errors="replace")[-800:].strip().splitlines()[-3:]
                raise ServeError(f"llama.cpp server for version {deployment.version} did not start: {' | '.join(tail)}")
            time.sleep(0.3)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, drain_timeout_s: float) -> None:
        """Wait until the requests it took are answered (at most `drain_timeout_s`), then end the process."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0, timeout=drain_timeout_s)
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.decliner is not None:
            self.decliner.close()


class JsonlLog:
    """An append-only JSONL file, rotated (renamed with a UTC timestamp) past `max_bytes`, redacted before writing."""

    def __init__(self, path: Path, max_bytes: int, pii_patterns: list[str]):
        self.path, self.max_bytes = path, max_bytes
        self.pii = [re.compile(p) for p in pii_patterns]
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        line = json.dumps(scrub(record, self.pii), ensure_ascii=False) + "\n"
        with self.lock:
            if self.path.is_file() and self.path.stat().st_size + len(line) > self.max_bytes:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                self.path.rename(self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}"))
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)


class Server:
    """The front server: forwards to the current backend, logs, takes feedback and follows the alias."""

    def __init__(self, config: RunConfig):
        if config.task != "documents":
            raise ServeError(
                f"doctune serve serves the documents track's chat models, not task {config.task}: the page-extraction "
                "model is served as in manifests/examples/page-extraction-inferenceservice.yaml (vLLM, schema-constrained)"
            )
        self.config = config
        self.serve = config.serve
        self.tracker = Tracker(config)
        self.log_dir = self.serve.log_dir or config.project.workdir / "serving"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.requests = JsonlLog(self.log_dir / "requests.jsonl", self.serve.max_log_bytes, self.serve.pii_patterns)
        self.feedback = JsonlLog(self.log_dir / "feedback.jsonl", self.serve.max_log_bytes, self.serve.pii_patterns)
        self.known: dict[str, str] = {}  # request id -> model version, for feedback (this process's requests)
        self.switch = threading.Lock()
        self.stopping = threading.Event()
        deployment = resolve(self.tracker, self.serve.alias, self.serve.variant, self.serve.retrieve, self.serve.version)
        try:
            self.httpd = ThreadingHTTPServer((self.serve.host, self.serve.port), _handler(self))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {self.serve.host}:{self.serve.port}: {exc.strerror or exc}; set serve.port"
            ) from None
        self.httpd.daemon_threads = True
        try:
            self.backend = self._start(deployment)
        except BaseException:
            self.httpd.server_close()
            raise
        self.follower = threading.Thread(target=self._follow, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _start(self, deployment: Deployment) -> Backend:
        return Backend(deployment, self.config, self.log_dir)

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.follower.start()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.switch:
            self.backend.stop(self.serve.request_timeout_s)

    # -- the alias ------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        while not self.stopping.wait(self.serve.poll_seconds):
            try:
                self.check_alias()
            except Exception as exc:  # an unreachable store or a bad new version: keep serving the current one
                print(f"doctune serve: still serving version {self.backend.deployment.version}: {exc}", flush=True)

    def check_alias(self) -> bool:
        """Serve the version the alias points at now, if it moved: True when the server switched. A pinned version
        (serve.version) stays."""
        if self.serve.version is not None:
            return False
        current = registry.version_by_alias(self.tracker, self.serve.alias)
        if current is None or str(current.version) == self.backend.deployment.version:
            return False
        new = self._start(resolve(self.tracker, self.serve.alias, self.serve.variant, self.serve.retrieve))
        with self.switch:
            old, self.backend = self.backend, new
        print(f"doctune serve: {self.serve.alias} moved to version {new.deployment.version}; now serving it", flush=True)
        threading.Thread(target=old.stop, args=(self.serve.request_timeout_s,), daemon=True).start()
        return True

    def acquire(self) -> Backend:
        with self.switch:
            backend = self.backend
            with backend.idle:
                backend.in_flight += 1
        return backend

    @staticmethod
    def release(backend: Backend) -> None:
        with backend.idle:
            backend.in_flight -= 1
            backend.idle.notify_all()

    # -- requests -------------------------------------------------------------------------------------------

    def chat(self, body: dict) -> tuple[int, dict, str]:
        """(status, reply, request id) for one chat completion request."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return 400, _error("'messages' must be a non-empty list of {role, content} objects"), ""
        if body.get("stream"):
            return 400, _error("streaming is not supported by doctune serve; send stream: false"), ""
        backend = self.acquire()
        deployment = backend.deployment
        if deployment.system_prompt and not any(m.get("role") == "system" for m in messages):
            body = {**body, "messages": [{"role": "system", "content": deployment.system_prompt}, *messages]}
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        verdict: dict = {}
        citations, lang = None, None
        try:
            last = _last_user(body["messages"])
            if backend.retriever is not None and last is not None and not carries_context(body["messages"][last]["content"]):
                user, citations, lang = backend.retriever.context(body["messages"][last]["content"])
                messages = list(body["messages"])
                messages[last] = {**messages[last], "content": user}
                body = {**body, "messages": messages}
            if backend.decliner is not None and _rag_request(body["messages"]):
                lang = lang or context_language(body["messages"][_last_user(body["messages"])]["content"])
                score = backend.decliner.score(body["messages"], lang)
                declined = score >= backend.decliner.threshold
                verdict = {"abstention_score": round(score, 6), "declined": declined, "reply_lang": lang}
            if verdict.get("declined"):
                status, reply, citations = 200, _declined(request_id, deployment, lang), None
            else:
                status, reply = _post(f"{backend.url}/v1/chat/completions", body, self.serve.request_timeout_s)
        except Exception as exc:  # a prompt the scorer or the template cannot take (too long, unknown roles): one line
            why = "the prompt cannot be scored" if isinstance(exc, ValueError) else "retrieval or scoring failed"
            status, reply = (400 if isinstance(exc, ValueError) else 500), _error(f"{why}: {exc}")
        finally:
            self.release(backend)
        latency = time.perf_counter() - started
        choices = reply.get("choices") or [{}]
        if citations is not None:  # which of the passages the reply cites, by the numbers the prompt gave them
            numbers = cited_numbers(str((choices[0].get("message") or {}).get("content") or ""), len(citations))
            citations = [{**c, "cited": c["label"] in numbers} for c in citations]
        cited = {"citations": citations, "retriever": backend.retriever.name} if citations is not None else {}
        reply = {**reply, "doctune": {"request_id": request_id, "model_version": deployment.version, **verdict, **cited}}
        if _purpose(body) == SELF_CONSISTENCY:  # the flywheel's own samples: not a user's request, not to be mined
            return status, reply, request_id
        self.requests.write({
            "request_id": request_id, "time": datetime.now(UTC).isoformat(), "model_version": deployment.version,
            "variant": deployment.variant, "abstention_threshold": deployment.abstention_threshold, **verdict,
            "retrieved": [c["chunk_id"] for c in citations] if citations is not None else None,
            "messages": body["messages"], "response": (choices[0].get("message") or {}).get("content"),
            "json_requested": _json_requested(body),
            "status": status, "latency_s": round(latency, 4), "usage": reply.get("usage"),
        })  # fmt: skip
        self.known[request_id] = deployment.version
        return status, reply, request_id

    def rate(self, body: dict) -> tuple[int, dict]:
        request_id, rating = body.get("request_id"), body.get("rating")
        if not isinstance(request_id, str) or request_id not in self.known:
            return 404, _error(f"request_id {request_id!r} was not served by this server")
        if rating not in ("up", "down", None):
            return 400, _error("'rating' must be 'up' or 'down'")
        correction = body.get("correction")
        if rating is None and not correction:
            return 400, _error("give a 'rating' (up or down), a 'correction', or both")
        if correction is not None and not isinstance(correction, str):
            return 400, _error("'correction' must be text")
        self.feedback.write({"request_id": request_id, "time": datetime.now(UTC).isoformat(), "rating": rating,
                             "correction": correction, "model_version": self.known[request_id]})  # fmt: skip
        return 200, {"ok": True}


def _error(message: str) -> dict:
    return {"error": {"message": message}}


def _last_user(messages: list[dict]) -> int | None:
    """The position of the last user turn, where its content is text (None otherwise)."""
    users = [n for n, m in enumerate(messages) if m.get("role") == "user"]
    return users[-1] if users and isinstance(messages[users[-1]].get("content"), str) else None


def _rag_request(messages: list[dict]) -> bool:
    """Whether the request asks with retrieved context: its last user turn carries it (as text)."""
    last = _last_user(messages)
    return last is not None and carries_context(messages[last]["content"])


def _purpose(body: dict) -> str | None:
    """Why a request was sent, where a doctune client says (the flywheel's self-consistency samples)."""
    metadata = body.get("metadata")
    purpose = metadata.get("doctune_purpose") if isinstance(metadata, dict) else None
    return purpose if isinstance(purpose, str) else None


def _json_requested(body: dict) -> bool:
    """Whether the client asked for JSON (OpenAI response_format): the flywheel mines replies that are not."""
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def _declined(request_id: str, deployment: Deployment, lang: str) -> dict:
    """An OpenAI chat completion whose reply is the abstention sentence in `lang`, generated by nobody."""
    message = {"role": "assistant", "content": abstention_in(lang, deployment.abstentions)}
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": f"v{deployment.version}", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }  # fmt: skip


def _post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, _error(f"the model server answered {exc.code}")
    except OSError as exc:
        return 502, _error(f"the model server did not answer: {exc}")


def _handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the request log is the JSONL file
            pass

        def _send(self, status: int, payload: dict, request_id: str = "") -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if request_id:
                self.send_header("X-Request-Id", request_id)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict | None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(413, _error(f"request body over {MAX_BODY} bytes"))
                return None
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as exc:
                self._send(400, _error(f"the request body is not JSON: {exc}"))
                return None
            if not isinstance(body, dict):
                self._send(400, _error("the request body must be a JSON object"))
                return None
            return body

        def do_GET(self) -> None:
            deployment = server.backend.deployment
            if self.path == "/health":
                self._send(200, {"status": "ok", "alias": server.serve.alias, "model_version": deployment.version,
                                 "variant": deployment.variant})  # fmt: skip
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": f"v{deployment.version}", "object": "model"}]})
            else:
                self._send(404, _error(f"no such path: {self.path}"))

        def do_POST(self) -> None:
            if self.path not in ("/v1/chat/completions", "/feedback"):
                self._send(404, _error(f"no such path: {self.path}"))
                return
            body = self._body()
            if body is None:
                return
            if self.path == "/feedback":
                self._send(*server.rate(body))
            else:
                status, reply, request_id = server.chat(body)
                self._send(status, reply, request_id)

    return Handler
