"""Records and files: the names of the files inside each artifact, JSONL/Parquet reading and writing, and the typed
SFT, DPO and eval records the stages exchange (see the data formats in the design contract).

A record that cannot be used is skipped and listed (file, line, reason), never fatal on its own: the consuming
stage decides what an empty result means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from doctune.chat import InvalidMessages, check_message, check_messages

# Files inside artifacts, by the artifact that holds them.
PAGES_FILE = "pages.parquet"  # ingest: pages
CHUNKS_FILE = "chunks.parquet"  # ingest: chunks
INGEST_REPORT_FILE = "ingest_report.json"  # ingest: report
TRAIN_FILE = "train.jsonl"  # synth: cpt, sft, dpo
VALIDATION_FILE = "validation.jsonl"  # synth: sft, dpo
GOLDEN_FILE = "golden.jsonl"  # synth: golden
UNANSWERABLE_FILE = "unanswerable.jsonl"  # synth: unanswerable
HELDOUT_FILE = "heldout.jsonl"  # synth: heldout (domain text no training stage sees)
SYSTEM_PROMPT_FILE = "system_prompt.txt"  # synth datasets, and every model artifact trained on them
ABSTENTIONS_FILE = "abstentions.json"  # beside the system prompt: {language: the sentence that declines}
LEGACY_ABSTENTION_FILE = "abstention.txt"  # one English sentence, as artifacts made before abstentions.json carry it
SYNTH_REPORT_FILE = "synth_report.json"
QUANTIZE_REPORT_FILE = "quantize_report.json"
GATE_REPORT_FILE = "gate_report.json"
RETRIEVER_REPORT_FILE = "retriever_report.json"  # retriever: report
PRODUCTION_FILE = "production.jsonl"  # synth: golden (relabeled served failures, held out: the production eval set)
# SFT record forms with no source chunk: general chats against forgetting, and what serving logged
# The page track's dataset (pages stage): train/validation as above, plus these.
PAGE_TEST_FILE = "test.jsonl"
PAGE_SCHEMA_FILE = "schema.json"
PAGE_INSTRUCTION_FILE = "instruction.txt"  # the user turn beside each page image; every page model carries it too
UNSOURCED_FORMS = frozenset({"rehearsal", "flywheel", "flywheel_positive"})
INDEX_FILE = "index.json"  # retriever: index (which retriever, its mode and chunk ids)
EMBEDDINGS_FILE = "embeddings.npy"  # retriever: index (the chunks' vectors, row i for chunk i of index.json)


class SkipRecord(ValueError):
    """One record that cannot be used; the reason goes to the stage's report."""


def read_jsonl(path: Path, skipped: list[dict]) -> list[dict]:
    """JSON object records of a file, each with its line number as `_line`; the others are listed in `skipped`. A
    line is decoded alone: one that is not UTF-8 (a write torn by a crash) costs that line, not the file."""
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))  # a BOM Windows editors write
            except UnicodeDecodeError:
                skipped.append({"file": Path(path).name, "line": number, "reason": "not UTF-8 text"})
                continue
            except json.JSONDecodeError as exc:
                skipped.append({"file": Path(path).name, "line": number, "reason": f"not JSON: {exc.msg}"})
                continue
            if not isinstance(record, dict):
                skipped.append({"file": Path(path).name, "line": number, "reason": "not a JSON object"})
                continue
            records.append(record | {"_line": number})
    return records


def page_check_records(dataset_dir: Path, count: int) -> list[dict]:
    """Up to `count` pages of a pages dataset to check a page model on: validation pages, then training pages, never
    an augmented copy and never a test page (the page gate keeps those for itself)."""
    records: list[dict] = []
    for name in (VALIDATION_FILE, TRAIN_FILE):
        path = Path(dataset_dir) / name
        if path.is_file():
            records += [r for r in read_jsonl(path, []) if not r.get("augmentation")]
    return records[:count]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_text_file(folder: Path, name: str) -> str | None:
    """A text file an artifact may carry (system prompt, abstention sentence); None when absent."""
    path = Path(folder) / name
    return path.read_text() if path.is_file() else None


def read_abstentions(folder: Path) -> dict[str, str] | None:
    """The abstention sentences an artifact carries, by language (an older artifact's one sentence as English);
    None when it carries none."""
    path = Path(folder) / ABSTENTIONS_FILE
    if path.is_file():
        sentences = json.loads(path.read_text())
        valid = isinstance(sentences, dict) and sentences and all(isinstance(v, str) and v.strip() for v in sentences.values())
        if not valid:
            raise ValueError(f"{path}: must map language codes to the sentences that decline, none empty")
        return sentences
    legacy = read_text_file(folder, LEGACY_ABSTENTION_FILE)
    return {"en": legacy.strip()} if legacy and legacy.strip() else None


def skip(skipped: list[dict], path: Path, record: dict, reason: str) -> None:
    skipped.append({"file": Path(path).name, "line": record.get("_line"), "reason": reason})


# -- typed records -----------------------------------------------------------------


def sft_messages(record: dict) -> list[dict]:
    """An SFT record's messages: at least two, the last a non-empty assistant reply following a user turn."""
    try:
        messages = check_messages(record.get("messages"), "messages", min_count=2)
    except InvalidMessages as exc:
        raise SkipRecord(str(exc)) from None
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise SkipRecord("the last message must be a non-empty assistant reply")
    if messages[-2]["role"] != "user":
        raise SkipRecord("the reply must follow a user message")
    return messages


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict]
    chosen: dict
    rejected: dict


def dpo_pair(record: dict) -> PreferencePair:
    """A DPO record (conversational form): a prompt ending in a user turn, two different assistant replies."""
    try:
        prompt = check_messages(record.get("prompt"), "prompt")
    except InvalidMessages:
        raise SkipRecord("field 'prompt' must be a non-empty list of {role, content} messages") from None
    if prompt[-1]["role"] != "user":
        raise SkipRecord("the prompt must end with a user message")
    replies = []
    for name in ("chosen", "rejected"):
        reply = record.get(name)
        try:
            message = check_message(reply[-1] if isinstance(reply, list) and reply else None, name)
        except InvalidMessages:
            message = None
        if message is None or message["role"] != "assistant" or not message["content"].strip():
            raise SkipRecord(f"field {name!r} must be a non-empty assistant reply")
        replies.append(message)
    if replies[0]["content"] == replies[1]["content"]:
        raise SkipRecord("chosen and rejected are the same reply")
    return PreferencePair(prompt, replies[0], replies[1])


@dataclass(frozen=True)
class EvalItem:
    question: str
    answer: str
    context_ids: list[str]  # the passages the prompt carries, ranked (the source chunk among them)
    source_ids: list[str]  # the chunks that hold the answer (qrels of retrieval quality)


def eval_item(record: dict) -> EvalItem:
    """A golden or unanswerable record: question, answer, source chunk ids, the context it is asked with."""
    question, answer, sources = record.get("question"), record.get("answer"), record.get("chunk_ids")
    if not isinstance(question, str) or not question.strip():
        raise SkipRecord("field 'question' must be a non-empty string")
    if not isinstance(answer, str):
        raise SkipRecord("field 'answer' must be a string")
    if not isinstance(sources, list) or not all(isinstance(c, str) for c in sources):
        raise SkipRecord("field 'chunk_ids' must be a list of chunk ids")
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    context = meta.get("context_chunk_ids") or sources
    if not isinstance(context, list) or not all(isinstance(c, str) for c in context):
        raise SkipRecord("field 'meta.context_chunk_ids' must be a list of chunk ids")
    return EvalItem(question, answer, list(context), list(sources))


def text_records(path: Path, skipped: list[dict]) -> list[dict]:
    """{text, source} records of a CPT or held-out file (source "domain" where unset); records without text are
    listed in `skipped` with the reason."""
    records = []
    for record in read_jsonl(path, skipped):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            skip(skipped, path, record, "field 'text' is missing or empty")
            continue
        records.append({"text": text, "source": record.get("source", "domain")})
    return records


def read_records(path: Path, parse, skipped: list[dict]) -> list:
    """Every record of a JSONL file that `parse` accepts; the others are listed in `skipped` with the reason."""
    out = []
    for record in read_jsonl(path, skipped):
        try:
            out.append(parse(record))
        except SkipRecord as exc:
            skip(skipped, path, record, str(exc))
    return out
