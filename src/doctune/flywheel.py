"""The data flywheel: what `doctune serve` logged, mined for failures, relabeled by people, and fed to the next run.

serve (requests.jsonl, feedback.jsonl) -> `collect` mines failures: thumbs down, corrections, invalid JSON where
JSON was asked, answers the retrieved passages do not support, answers the model does not repeat when asked again
-> a labeling queue (Label Studio tasks) -> labels read back (Label Studio exports or JSONL) -> `examples`: SFT
records (each relabeled failure `upsample` times, with answers users rated up kept beside them), DPO pairs (the
correction chosen over the logged answer) and a production eval set held out by a hash of the question. Synth adds
them to its datasets; the gate scores the production set.

Every bad line, unknown request id or unusable label is listed with its file and reason, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from doctune.chat import ABSTENTIONS, CONTEXT_HEADER, InvalidMessages, carries_context, check_messages
from doctune.citations import strip_citations
from doctune.config import RunConfig
from doctune.endpoint import ChatClient, EndpointError
from doctune.records import SkipRecord, dpo_pair, read_jsonl, sft_messages, skip
from doctune.redact import scrub

REQUESTS_GLOB, FEEDBACK_GLOB = "requests*.jsonl", "feedback*.jsonl"
LABEL_GLOBS = ("*.json", "*.jsonl")
REASONS = ("thumbs_down", "corrected", "labeled", "invalid_json", "ungrounded", "uncertain")
# Requests the flywheel itself sends (self-consistency samples) carry this: serve answers them without logging them.
SELF_CONSISTENCY = "self-consistency"
SAMPLE_MARK = {"metadata": {"doctune_purpose": SELF_CONSISTENCY}}
QUESTION_MARK = "\n\nQuestion: "  # how rag_user_message ends its context
ACCEPTED = frozenset({"correct", "accept", "accepted", "good"})  # a label saying the logged answer was right
QUEUE_FILE, LABEL_CONFIG_FILE = "labeling_queue.json", "labeling_config.xml"
_WORD = re.compile(r"\w+", re.UNICODE)

# The Label Studio project the queue is made for: the question, its passages and the logged answer shown; the
# annotator writes the right answer, or marks the logged one correct.
LABEL_CONFIG = """<View>
  <Header value="Question"/>
  <Text name="question" value="$question"/>
  <Header value="Passages the model was given"/>
  <Text name="context" value="$context"/>
  <Header value="The model's answer ($reasons)"/>
  <Text name="response" value="$response"/>
  <Choices name="verdict" toName="response" choice="single">
    <Choice value="correct"/>
    <Choice value="wrong"/>
  </Choices>
  <Header value="The right answer (or the abstention sentence), where the model's is wrong"/>
  <TextArea name="answer" toName="question" rows="4"/>
</View>
"""


@dataclass
class Interaction:
    """One served request joined with its latest feedback."""

    request_id: str
    time: str
    model_version: str
    messages: list[dict]  # the prompt as the model saw it: system prompt and retrieved context included
    response: str
    declined: bool = False
    json_requested: bool = False
    rating: str | None = None
    correction: str | None = None
    reasons: list[str] = field(default_factory=list)
    grounding: float | None = None
    agreement: float | None = None  # mean token F1 of the answer with answers sampled again (self-consistency)

    @property
    def user_turn(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"), "")

    @property
    def question(self) -> str:
        """The question without the passages retrieved for it."""
        user = self.user_turn
        return user.rsplit(QUESTION_MARK, 1)[-1].strip() if carries_context(user) else user.strip()

    @property
    def context(self) -> str:
        user = self.user_turn
        return user[len(CONTEXT_HEADER) :].rsplit(QUESTION_MARK, 1)[0] if carries_context(user) else ""


@dataclass
class Flywheel:
    """What one run takes from serving."""

    interactions: int = 0
    failures: list[Interaction] = field(default_factory=list)
    positives: list[Interaction] = field(default_factory=list)
    labels: dict[str, dict] = field(default_factory=dict)  # request id -> {"answer", "accepted"} or {"accepted": True}
    skipped: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    window: tuple[str, str] | None = None  # first and last request time read

    def queue(self) -> list[Interaction]:
        """Failures no person has labeled yet."""
        return [f for f in self.failures if f.request_id not in self.labels]


def log_dir(config: RunConfig) -> Path:
    return config.flywheel.log_dir or config.serve.log_dir or config.project.workdir / "serving"


def labels_dir(config: RunConfig) -> Path:
    return config.flywheel.labels_dir or log_dir(config) / "labels"


def source_files(config: RunConfig) -> list[Path]:
    """The logs and label files a run reads, in a stable order (what synth's reuse key is computed from)."""
    logs, labels = log_dir(config), labels_dir(config)
    files = [p for pattern in (REQUESTS_GLOB, FEEDBACK_GLOB) for p in sorted(logs.glob(pattern))] if logs.is_dir() else []
    if labels.is_dir():
        files += sorted({p for pattern in LABEL_GLOBS for p in labels.glob(pattern)})
    return [p for p in files if p.is_file()]


def sources_digest(config: RunConfig) -> str:
    """A digest of the logs' and labels' contents: synth is rerun when users asked, rated or labeled anything new."""
    if not config.flywheel.enabled:
        return "off"
    digest = hashlib.sha256()
    for path in source_files(config):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def content_words(text: str) -> list[str]:
    """Words that carry content in any language: four letters or more, or holding a digit."""
    return [w for w in _WORD.findall(text.lower()) if len(w) >= 4 or any(c.isdigit() for c in w)]


def grounding(answer: str, context: str) -> float | None:
    """Share of the answer's content words found in the passages (None: nothing to check); its citation markers
    are no words of it."""
    words = content_words(strip_citations(answer))
    if not words or not context:
        return None
    known = set(content_words(context))
    return sum(w in known for w in words) / len(words)


def _valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _records(path: Path, skipped: list[dict]) -> list[dict]:
    """read_jsonl, with a file that cannot be read listed instead of raised (a log rotated away while reading)."""
    try:
        return read_jsonl(path, skipped)
    except OSError as exc:
        skipped.append({"file": path.name, "line": None, "reason": f"unreadable: {exc}"})
        return []


def _text_messages(messages: object) -> object:
    """OpenAI messages with content given as text parts ([{"type": "text", "text": ...}]) flattened to text; other
    parts (images) are left for check_messages to refuse."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
        out.append(message)
    return out


def read_interactions(directory: Path, skipped: list[dict], counts: Counter, pii: list[re.Pattern[str]]) -> list[Interaction]:
    """Logged requests that were answered (status 200), each joined with its latest feedback; secrets and `pii`
    matches redacted."""
    by_id: dict[str, Interaction] = {}
    for path in sorted(directory.glob(REQUESTS_GLOB)):
        for record in _records(path, skipped):
            request_id, response = record.get("request_id"), record.get("response")
            try:
                messages = check_messages(_text_messages(record.get("messages")))
            except InvalidMessages as exc:
                skip(skipped, path, record, str(exc))
                continue
            if not isinstance(request_id, str):
                skip(skipped, path, record, "no request_id")
                continue
            if record.get("status") != 200 or not isinstance(response, str):
                counts["requests_not_answered"] += 1  # a server error is not the model's answer
                continue
            response = scrub(response, pii)  # written by serve already; a hand-edited log need not be
            messages = scrub(messages, pii)
            by_id[request_id] = Interaction(
                request_id=request_id, time=str(record.get("time", "")), model_version=str(record.get("model_version", "")),
                messages=messages, response=response, declined=bool(record.get("declined")),
                json_requested=bool(record.get("json_requested")),
            )  # fmt: skip
    for path in sorted(directory.glob(FEEDBACK_GLOB)):
        for record in _records(path, skipped):
            interaction = by_id.get(record.get("request_id"))
            if interaction is None:
                skip(skipped, path, record, "feedback for a request the logs do not hold (rotated away or another server's)")
                continue
            if record.get("rating") in ("up", "down"):
                interaction.rating = record["rating"]
            if isinstance(record.get("correction"), str) and record["correction"].strip():
                interaction.correction = scrub(record["correction"].strip(), pii)
    return sorted(by_id.values(), key=lambda i: (i.time, i.request_id))


def _same(a: str, b: str) -> bool:
    """The same answer, whatever its citation markers (a person's correction rarely carries them)."""
    return " ".join(strip_citations(a).split()) == " ".join(strip_citations(b).split())


def mine(interaction: Interaction, label: dict | None, min_grounding: float, min_agreement: float) -> list[str]:
    """Why an answer is a failure (empty: it is not). A person's verdict outranks the automatic checks: an answer
    rated up, or labeled correct, without a correction is not mined; a label that rewrites it makes it a failure."""
    reasons = []
    if interaction.rating == "down":
        reasons.append("thumbs_down")
    if interaction.correction:
        reasons.append("corrected")
    if label and "answer" in label and not _same(label["answer"], interaction.response):
        reasons.append("labeled")
    if (interaction.rating == "up" or (label or {}).get("accepted")) and not reasons:
        return reasons
    if interaction.declined:  # the abstention sentence was served, not generated: nothing else to check
        return reasons
    if interaction.json_requested and not _valid_json(interaction.response):
        reasons.append("invalid_json")
    if not any(sentence in interaction.response for sentence in ABSTENTIONS.values()):
        interaction.grounding = grounding(interaction.response, interaction.context)
        if interaction.grounding is not None and interaction.grounding < min_grounding:
            reasons.append("ungrounded")
    if interaction.agreement is not None and interaction.agreement < min_agreement:
        reasons.append("uncertain")
    return reasons


def word_f1(a: str, b: str) -> float:
    """Token F1 of two texts' lower-cased words (any language)."""
    x, y = _WORD.findall(a.lower()), _WORD.findall(b.lower())
    if not x or not y:
        return float(x == y)
    common = sum((Counter(x) & Counter(y)).values())
    return 0.0 if not common else 2 * common / (len(x) + len(y))


def check_consistency(interactions: list[Interaction], config: RunConfig, out: Flywheel) -> None:
    """Sample each answer again `consistency_samples` times through the served model and record how much the
    logged answer agrees with them: an answer the model itself does not repeat is uncertain. An endpoint that
    cannot be reached leaves the check out (said in the report), never the run."""
    cfg = config.flywheel
    client = ChatClient(cfg.consistency_endpoint, role="self-consistency", section="flywheel.consistency_endpoint",
                        extra_body=SAMPLE_MARK)  # fmt: skip
    served = served_version(cfg.consistency_endpoint.base_url)
    todo = [
        i for i in interactions
        if not i.declined and not i.json_requested and i.response.strip() and i.rating is None and i.correction is None
        and i.request_id not in out.labels and (served is None or i.model_version == served)
    ][-cfg.consistency_max_items :]  # fmt: skip

    def agreement(interaction: Interaction) -> float:
        samples = [client.chat(interaction.messages) for _ in range(cfg.consistency_samples)]
        return sum(word_f1(interaction.response, s) for s in samples) / len(samples)

    try:
        with ThreadPoolExecutor(cfg.consistency_endpoint.max_concurrency) as pool:
            for interaction, value in zip(todo, pool.map(agreement, todo)):
                interaction.agreement = value
    except EndpointError as exc:
        for interaction in todo:
            interaction.agreement = None
        out.skipped.append(
            {"file": "flywheel.consistency_endpoint", "line": None, "reason": f"self-consistency not checked: {exc}"}
        )
        return
    out.counts["consistency_checked"] = len(todo)


def served_version(base_url: str) -> str | None:
    """The registry version a `doctune serve` endpoint serves (its /health says), or None for another server: an
    answer is compared with samples of the model that gave it, never of a later champion."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/").removesuffix("/v1") + "/health", timeout=10) as response:
            version = json.loads(response.read()).get("model_version")
    except (OSError, ValueError, AttributeError):
        return None
    return str(version) if version is not None else None


def read_labels(directory: Path, skipped: list[dict]) -> dict[str, dict]:
    """request id -> {"answer": text, "accepted": bool} or {"accepted": True}, from Label Studio JSON exports (an
    "answer" text area, a "verdict" choice) and JSONL rows {request_id, answer | verdict}. A later file wins."""
    labels: dict[str, dict] = {}
    if not directory.is_dir():
        return labels
    for path in sorted({p for pattern in LABEL_GLOBS for p in directory.glob(pattern)}):
        if path.suffix == ".jsonl":
            rows = [(r.get("request_id"), r.get("answer"), r.get("verdict"), r) for r in _records(path, skipped)]
        else:
            try:
                tasks = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                skipped.append({"file": path.name, "line": None, "reason": f"not a Label Studio JSON export: {exc}"})
                continue
            if not isinstance(tasks, list):
                skipped.append({"file": path.name, "line": None, "reason": "not a Label Studio JSON export (a list of tasks)"})
                continue
            rows = [_label_studio_row(n, task) for n, task in enumerate(tasks, start=1)]
        for request_id, answer, verdict, record in rows:
            accepted = isinstance(verdict, str) and verdict.lower() in ACCEPTED
            if not isinstance(request_id, str):
                skip(skipped, path, record, "no request_id")
            elif isinstance(answer, str) and answer.strip():
                labels[request_id] = {"answer": answer.strip(), "accepted": accepted}
            elif accepted:
                labels[request_id] = {"accepted": True}
            else:
                skip(skipped, path, record, "neither an answer nor a 'correct' verdict")
    return labels


def _label_studio_row(number: int, task: object) -> tuple[object, object, object, dict]:
    """(request id, answer, verdict, where) of one exported task: its latest annotation that was not cancelled.
    Shapes other than Label Studio's give no answer and no verdict (the task is then listed, not fatal)."""
    where = {"_line": f"task {number}"}
    if not isinstance(task, dict):
        return None, None, None, where
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    annotations = task.get("annotations") if isinstance(task.get("annotations"), list) else []
    annotations = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    results = annotations[-1].get("result") if annotations else None
    answer = verdict = None
    for result in results if isinstance(results, list) else []:
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, dict):
            continue
        if result.get("from_name") == "answer":
            text = value.get("text")
            parts = [text] if isinstance(text, str) else text if isinstance(text, list) else []
            answer = "\n".join(t for t in parts if isinstance(t, str)) or None
        elif result.get("from_name") == "verdict":
            choices = value.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], str):
                verdict = choices[0]
    return data.get("request_id"), answer, verdict, where


def collect(config: RunConfig) -> Flywheel:
    """The logs and labels of this deployment, mined."""
    out = Flywheel()
    if not config.flywheel.enabled or not log_dir(config).is_dir():
        return out
    pii = [re.compile(p) for p in config.serve.pii_patterns]
    interactions = read_interactions(log_dir(config), out.skipped, out.counts, pii)
    out.interactions = len(interactions)
    if interactions:
        out.window = (interactions[0].time, interactions[-1].time)
    out.labels = scrub(read_labels(labels_dir(config), out.skipped), pii)
    known = {i.request_id: i for i in interactions}
    for request_id in sorted(set(out.labels) - set(known)):
        out.skipped.append({"file": labels_dir(config).name, "line": None,
                            "reason": f"label for request {request_id}, which the logs do not hold"})  # fmt: skip
        del out.labels[request_id]
    for request_id, label in list(out.labels.items()):
        # Label Studio fills the text area with the logged answer: "wrong" without rewriting it corrects nothing.
        if "answer" in label and not label["accepted"] and _same(label["answer"], known[request_id].response):
            out.skipped.append({"file": labels_dir(config).name, "line": None, "reason": f"label for request "
                                f"{request_id} marks the answer wrong but gives no other answer"})  # fmt: skip
            del out.labels[request_id]
    if config.flywheel.consistency_samples and interactions:
        check_consistency(interactions, config, out)
    for interaction in interactions:
        label = out.labels.get(interaction.request_id)
        interaction.reasons = mine(interaction, label, config.flywheel.min_grounding, config.flywheel.min_agreement)
        out.counts.update(f"mined_{r}" for r in interaction.reasons)
        if interaction.correction and label is None:
            out.labels[interaction.request_id] = {"answer": interaction.correction}  # the user's own correction is a label
        if interaction.reasons:
            out.failures.append(interaction)
        elif interaction.rating == "up" or (label or {}).get("accepted"):
            out.positives.append(interaction)
    out.counts["failures"] = len(out.failures)
    out.counts["positives"] = len(out.positives)
    out.counts["labeled_failures"] = sum(f.request_id in out.labels for f in out.failures)
    out.counts["queued"] = len(out.queue())
    return out


def label_studio_tasks(failures: list[Interaction]) -> list[dict]:
    """Label Studio import tasks, the logged answer given as a prediction the annotator edits or accepts."""
    return [
        {
            "data": {"request_id": f.request_id, "question": f.question, "context": f.context, "response": f.response,
                     "reasons": ", ".join(f.reasons), "model_version": f.model_version},
            "predictions": [{"model_version": f.model_version, "result": [
                {"from_name": "answer", "to_name": "question", "type": "textarea", "value": {"text": [f.response]}}]}],
        }
        for f in failures
    ]  # fmt: skip


def write_queue(fly: Flywheel, directory: Path) -> Path:
    """The unlabeled failures as a Label Studio import file, with the project's labeling config beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LABEL_CONFIG_FILE).write_text(LABEL_CONFIG)
    path = directory / QUEUE_FILE
    path.write_text(json.dumps(label_studio_tasks(fly.queue()), indent=1, ensure_ascii=False))
    return path


def held_out(question: str, fraction: float, seed: int) -> bool:
    """Whether a question belongs to the production eval set: a hash, so a question stays on its side run after run."""
    normal = " ".join(_WORD.findall(question.lower()))  # punctuation and spacing do not move a question
    return int(hashlib.sha256(f"{seed}|{normal}".encode()).hexdigest()[:12], 16) / 16**12 < fraction


def _prompt(interaction: Interaction) -> list[dict]:
    return [dict(m) for m in interaction.messages]


@dataclass
class Examples:
    sft: list[dict] = field(default_factory=list)
    dpo: list[dict] = field(default_factory=list)
    production: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def _trainable(record: dict, check, counts: Counter, name: str) -> bool:
    """Whether a record is one the SFT / DPO stage takes (a prompt ending in a user turn, a non-empty reply...)."""
    try:
        check(record)
    except SkipRecord:
        counts[f"{name}_not_trainable"] += 1
        return False
    return True


def examples(fly: Flywheel, config: RunConfig, seed: int) -> Examples:
    """Training and production-eval records from the labeled failures and the rated-up answers. A record the
    training stages would refuse (an empty logged answer, a prompt ending in an assistant turn) is counted, not
    written."""
    cfg, out = config.flywheel, Examples()
    trained = 0
    for failure in fly.failures:
        label = fly.labels.get(failure.request_id)
        if label is None:
            continue
        answer = label.get("answer") or failure.response  # accepted as logged where the label gives no other answer
        meta = {"form": "flywheel", "question": failure.question, "request_id": failure.request_id,
                "reasons": failure.reasons, "model_version": failure.model_version}  # fmt: skip
        if held_out(failure.question, cfg.production_fraction, seed):
            item = {"messages": _prompt(failure), "answer": answer, "meta": meta}
            if failure.messages[-1]["role"] == "user" and answer.strip():
                out.production.append(item)
            else:
                out.counts["production_not_usable"] += 1
            continue
        record = {"messages": [*_prompt(failure), {"role": "assistant", "content": answer}], "meta": meta}
        if not _trainable(record, sft_messages, out.counts, "sft"):
            continue
        trained += 1
        out.sft += [record] * cfg.upsample
        if not _same(answer, failure.response):
            # Both without markers: a pair that differs in whether it cites would teach the model to stop citing.
            pair = {"prompt": _prompt(failure), "chosen": [{"role": "assistant", "content": strip_citations(answer)}],
                    "rejected": [{"role": "assistant", "content": strip_citations(failure.response)}],
                    "meta": meta}  # fmt: skip
            if _trainable(pair, dpo_pair, out.counts, "dpo"):
                out.dpo.append(pair)
    wanted = round(cfg.positive_share / (1 - cfg.positive_share) * len(out.sft)) if cfg.positive_share > 0 else 0
    positives, seen = [], set()
    for positive in reversed(fly.positives):  # the newest first: what the current model does well
        key = " ".join(_WORD.findall(positive.question.lower()))
        if key in seen or held_out(positive.question, cfg.production_fraction, seed):
            continue
        seen.add(key)
        meta = {"form": "flywheel_positive", "question": positive.question, "request_id": positive.request_id,
                "model_version": positive.model_version}  # fmt: skip
        record = {"messages": [*_prompt(positive), {"role": "assistant", "content": positive.response}], "meta": meta}
        if len(positives) < wanted and _trainable(record, sft_messages, out.counts, "positive"):
            positives.append(record)
    out.sft += positives
    out.counts.update({
        "relabeled_trained": trained, "sft_failure_records": trained * cfg.upsample,
        "sft_positive_records": len(positives), "positives_wanted": wanted, "dpo_pairs": len(out.dpo),
        "production_items": len(out.production),
    })  # fmt: skip
    return out


def report(fly: Flywheel, made: Examples | None = None) -> dict:
    """The data report's flywheel section."""
    total = (made.counts["sft_failure_records"] + made.counts["sft_positive_records"]) if made else 0
    return {
        "interactions": fly.interactions,
        "window": list(fly.window) if fly.window else None,
        "counts": dict(fly.counts) | (dict(made.counts) if made else {}),
        "positive_share": made.counts["sft_positive_records"] / total if made and total else None,
        "queued": [{"request_id": f.request_id, "question": f.question, "reasons": f.reasons} for f in fly.queue()[:20]],
        "skipped": fly.skipped,
    }
