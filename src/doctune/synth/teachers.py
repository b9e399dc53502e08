"""Teachers turn a chunk into question/answer pairs; generation is checkpointed per chunk and resumable.

- extractive: deterministic, no model (extractive.py);
- endpoint: any OpenAI-compatible chat API, bounded concurrency, timeouts, retries with backoff;
- local: a transformers model named in config, same prompts as the endpoint.
LLM output must be JSON of the QA schema: malformed output is retried once, then dropped and counted.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from doctune.chat import conversation
from doctune.config import SynthConfig
from doctune.endpoint import ChatClient, EndpointError, PairwiseJudge
from doctune.generation import chat_replies
from doctune.records import read_jsonl
from doctune.redact import redact_obj
from doctune.synth.extractive import QA, SECTION_PATH, extractive_questions, fold
from doctune.synth.languages import language, language_name
from doctune.synth.prompts import QA_SCHEMA, TEACHER_SYSTEM, teacher_prompt


class Teacher(Protocol):
    name: str

    def questions(self, chunk: dict) -> tuple[list[QA], dict]:
        """QA for one chunk, and a record of the exchange (kept as an artifact)."""
        ...

    def handles(self, lang: str) -> str | None:
        """Why the teacher cannot write in a language (ISO 639-1), or None."""
        ...


class ExtractiveTeacher:
    name = "extractive"

    @staticmethod
    def handles(lang: str) -> str | None:
        """Why this teacher can't write questions in a language, or None when it can."""
        if language(lang) is None:
            return f"the extractive teacher has no question templates for {language_name(lang)} ({lang or 'undetected'})"
        return None

    def __init__(self, config: SynthConfig):
        self.limit = config.max_questions

    def questions(self, chunk: dict) -> tuple[list[QA], dict]:
        return extractive_questions(chunk, self.limit), {}


def parse_questions(content: str, chunk: dict, limit: int) -> list[QA] | None:
    """QA from an LLM reply, or None when the reply is not JSON of the expected shape."""
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, TypeError):
        return None
    items = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    out = []
    for item in items[:limit]:
        if not isinstance(item, dict):
            continue
        question, answer = fold(str(item.get("question", ""))), fold(str(item.get("answer", "")))
        if len(question) < 8 or not answer:
            continue
        start = chunk["text"].find(answer)
        out.append(
            QA(
                question=question,
                answer=answer,
                chunk_id=chunk["chunk_id"],
                qtype="generated",
                answer_start=start,
                answer_end=start + len(answer) if start >= 0 else -1,
                evidence=answer,
            )
        )
    return out


def section_for_teacher(chunk: dict) -> str:
    """The section an LLM teacher is told about: with its parent heading where the title alone names several."""
    named = chunk.get("section_named") or ""
    return named if SECTION_PATH in named else chunk.get("section", "")


class EndpointTeacher:
    name = "endpoint"

    @staticmethod
    def handles(lang: str) -> str | None:
        return None  # an LLM teacher is prompted in the passage's language

    def __init__(self, config: SynthConfig):
        self.config = config
        self.client = ChatClient(config.endpoint)

    def _ask(self, chunk: dict) -> str:
        section = section_for_teacher(chunk)
        lang = language_name(chunk.get("lang") or "en")
        prompt = teacher_prompt(chunk["text"], section, self.config.min_questions, self.config.max_questions, lang)
        return self.client.complete(TEACHER_SYSTEM, prompt, QA_SCHEMA)

    def questions(self, chunk: dict) -> tuple[list[QA], dict]:
        replies = []
        for _ in range(2):  # malformed -> one retry -> dropped
            content = self._ask(chunk)
            replies.append(content)
            parsed = parse_questions(content, chunk, self.config.max_questions)
            if parsed is not None:
                return parsed, {"chunk_id": chunk["chunk_id"], "replies": replies, "malformed": len(replies) - 1}
        return [], {"chunk_id": chunk["chunk_id"], "replies": replies, "malformed": len(replies)}

    def judge(self, question: str, first: str, second: str) -> str | None:
        """'A', 'B', or None when the reply is unusable."""
        return PairwiseJudge(self.client).prefers(question, first, second)[0]


class LocalTeacher:
    """A transformers model generating with the endpoint's prompts (no server needed, slow on CPU)."""

    name = "local"

    @staticmethod
    def handles(lang: str) -> str | None:
        return None  # an LLM teacher is prompted in the passage's language

    def __init__(self, config: SynthConfig, cache_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from doctune.models import resolve_model

        folder = resolve_model(config.local.model, cache_dir)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder)
        self.model.eval()

    def _generate(self, user: str) -> str:
        (reply,) = chat_replies(
            self.model, self.tokenizer, [conversation(user, TEACHER_SYSTEM)], self.config.local.max_new_tokens
        )
        return reply.text

    def questions(self, chunk: dict) -> tuple[list[QA], dict]:
        section = section_for_teacher(chunk)
        lang = language_name(chunk.get("lang") or "en")
        prompt = teacher_prompt(chunk["text"], section, self.config.min_questions, self.config.max_questions, lang)
        replies = []
        for _ in range(2):
            content = self._generate(prompt)
            replies.append(content)
            # Small models wrap JSON in prose: take the outermost object.
            start, end = content.find("{"), content.rfind("}")
            parsed = parse_questions(content[start : end + 1], chunk, self.config.max_questions) if start >= 0 else None
            if parsed is not None:
                return parsed, {"chunk_id": chunk["chunk_id"], "replies": replies, "malformed": len(replies) - 1}
        return [], {"chunk_id": chunk["chunk_id"], "replies": replies, "malformed": len(replies)}


def make_teacher(config: SynthConfig, cache_dir: Path) -> Teacher:
    if config.teacher == "endpoint":
        return EndpointTeacher(config)
    if config.teacher == "local":
        return LocalTeacher(config, cache_dir)
    return ExtractiveTeacher(config)


def generate(
    teacher: Teacher, chunks: list[dict], checkpoint: Path, concurrency: int = 1
) -> tuple[list[QA], list[dict], Counter]:
    """Questions for every chunk, resuming from `checkpoint` (JSONL, one line per finished chunk).

    A chunk is written once it is done, so a crash loses at most the chunks in flight and a rerun neither
    repeats nor duplicates finished ones. Raises EndpointError with everything done so far kept.
    """
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    if checkpoint.is_file():  # a line cut short by a crash is skipped: that chunk is simply redone
        done = {r["chunk_id"]: r for r in read_jsonl(checkpoint, []) if isinstance(r.get("chunk_id"), str)}
    todo = [c for c in chunks if c["chunk_id"] not in done]
    lock = threading.Lock()
    stop = threading.Event()  # the endpoint is down: queued chunks should not each retry first

    def work(chunk: dict) -> None:
        if stop.is_set():
            return
        try:
            qas, exchange = teacher.questions(chunk)
        except EndpointError:
            stop.set()
            raise
        # The raw replies are kept on disk: a server that echoes a secret must not get it written here.
        record = {"chunk_id": chunk["chunk_id"], "qa": [q.to_dict() for q in qas], "exchange": redact_obj(exchange)}
        with lock, open(checkpoint, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            done[chunk["chunk_id"]] = record

    if concurrency <= 1:
        for chunk in todo:
            work(chunk)
    elif todo:
        # The first chunk alone: an endpoint that refuses the key or is down fails one request, not `concurrency`.
        work(todo[0])
        with ThreadPoolExecutor(concurrency) as pool:
            try:
                for future in [pool.submit(work, chunk) for chunk in todo[1:]]:
                    future.result()
            except BaseException:  # down, or interrupted: the queued chunks must not go on calling the endpoint
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    counts: Counter = Counter(resumed_chunks=len(chunks) - len(todo))
    qas, exchanges = [], []
    for chunk in chunks:  # chunk order, whatever order they finished in
        record = done[chunk["chunk_id"]]
        qas.extend(QA.from_dict(q) for q in record["qa"])
        if record["exchange"]:
            exchanges.append(record["exchange"])
            counts["malformed_replies"] += record["exchange"].get("malformed", 0)
            counts["dropped_malformed_chunks"] += 1 if record["exchange"].get("malformed", 0) >= 2 else 0
    return qas, exchanges, counts
