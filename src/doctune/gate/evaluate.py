"""One model scored on the gate's sets: the same prompts, chat template and greedy decoding for every model."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from doctune.chat import (
    InvalidMessages,
    abstention_in,
    check_messages,
    conversation,
    rag_user_message,
    render_ids,
    reply_sequences,
    with_user_cut,
)
from doctune.citations import chunk_passage, cited_numbers, strip_citations, supporting_passages
from doctune.gate.metrics import OPTIONAL_METRICS, PER_ITEM_METRICS, abstains, exact_match, probe_passes, rouge_l, token_f1
from doctune.langid import passages_language
from doctune.records import EvalItem, SkipRecord, eval_item, read_jsonl, skip
from doctune.runtimes import open_runtime
from doctune.textblocks import perplexity_blocks


@dataclass
class EvalSets:
    """What every model is scored on, built once per gate run."""

    system_prompt: str
    abstentions: dict[str, str]  # language -> the sentence that declines (chat.ABSTENTIONS as synth stored them)
    # {question, answer, context: [labelled passage...] in the order the prompt shows them, supporting: the numbers
    # of the passages that hold the answer, reply_lang: the passages' language, qtype, doc_id, lang, document}
    golden: list[dict]
    unanswerable: list[dict]
    probes: list[dict]
    heldout_texts: list[str]  # domain text no training stage saw: packed with each model's own tokenizer
    general_texts: list[str]
    block_size: int
    max_blocks: int
    production: list[dict] = field(default_factory=list)  # relabeled served failures: {messages, answer, question}
    closed_book: int = 0  # the first golden items (a stratified list) also asked without context
    abstention_scores: bool = False  # score the abstention sentence as every RAG prompt's reply (the abstention bound)
    skipped: list[dict] = field(default_factory=list)

    def conversations(self, items: list[dict]) -> list[list[dict]]:
        """The prompts as training data shows them: the passages in their recorded (already edge-ordered) order."""
        return [conversation(rag_user_message(item["question"], item["context"]), self.system_prompt) for item in items]

    def closed_book_conversations(self) -> list[list[dict]]:
        """The plain question under the same system prompt: what the model answers from its own weights."""
        return [conversation(item["question"], self.system_prompt) for item in self.golden[: self.closed_book]]


def shipped_probes() -> list[dict]:
    text = resources.files("doctune.gate").joinpath("data/capability_probes.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def shipped_general_text() -> list[str]:
    text = resources.files("doctune.gate").joinpath("data/general_text.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


LABELS = ("qtype", "doc_id", "lang")  # what an item is, from the record's meta: per-type tables, stratified selection


N_CTX = 4096  # tokens of context every model is scored with


def fitted(tokenizer, messages: list[dict], limit: int) -> list[dict]:
    """`messages` whose rendered prompt takes at most `limit` tokens, the last user turn cut in the middle."""
    over = len(render_ids(tokenizer, messages, generation_prompt=True)) - limit
    return with_user_cut(tokenizer, messages, over) if over > 0 else messages


def production_items(path: Path, limit: int, skipped: list[dict]) -> list[dict]:
    """The production eval set (relabeled served failures synth held out): the prompt as served, the labeled answer."""
    items = []
    for record in read_jsonl(path, skipped) if path.is_file() else []:
        try:
            messages = check_messages(record.get("messages"))
        except InvalidMessages as exc:
            skip(skipped, path, record, str(exc))
            continue
        if messages[-1]["role"] != "user" or not isinstance(record.get("answer"), str) or not record["answer"].strip():
            skip(skipped, path, record, "not a production eval record: a prompt ending with the user turn, and an answer")
            continue
        question = (record.get("meta") or {}).get("question") or messages[-1]["content"]
        items.append({"messages": messages, "answer": record["answer"], "question": str(question)})
    return items[:limit]


def eval_items(path: Path, chunks: dict[str, dict], limit: int, skipped: list[dict]) -> list[dict]:
    """Golden/unanswerable records with their recorded context passages and labels, at most `limit` of them in
    stratified order; unusable records are listed, not fatal."""
    items = []
    for record in read_jsonl(path, skipped):
        try:
            item: EvalItem = eval_item(record)
        except SkipRecord as exc:
            skip(skipped, path, record, f"not an eval record: {exc}")
            continue
        missing = [i for i in item.context_ids if i not in chunks]
        if missing:
            skip(skipped, path, record, f"context chunks {missing} are not in the chunks")
            continue
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        labels = {k: str(meta[k]) if meta.get(k) not in (None, "") else "unknown" for k in LABELS}
        labels["document"] = str(meta.get("source") or labels["doc_id"])  # the file name where synth recorded it
        shown = [chunks[i] for i in item.context_ids]
        evidence = meta.get("evidence") if isinstance(meta.get("evidence"), str) else ""
        supporting = supporting_passages(item.context_ids, [c["text"] for c in shown], item.source_ids, evidence)
        items.append(
            {"question": item.question, "answer": item.answer, "context": [chunk_passage(c) for c in shown],
             "supporting": supporting,
             "reply_lang": passages_language([c.get("lang") for c in shown], [c["text"] for c in shown]),
             **labels}
        )  # fmt: skip
    return stratified(items, limit)


def stratified(items: list[dict], limit: int) -> list[dict]:
    """At most `limit` items, round-robin over (doc_id, qtype) groups in order of first appearance, record order
    within a group: one manual or one question template cannot fill the set, and the first items already span the
    groups (the closed-book questions are the first ones)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for item in items:
        groups.setdefault((item.get("doc_id", "unknown"), item.get("qtype", "unknown")), []).append(item)
    queues = list(groups.values())
    out: list[dict] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        out += [q[rank] for q in queues if rank < len(q)]
        if len(out) >= limit:
            break
    return out[:limit]


def blocks(sets: EvalSets, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(domain, general) perplexity blocks in a model's own token ids: models with other tokenizers stay comparable
    on the same text."""
    domain_blocks = perplexity_blocks(sets.heldout_texts, tokenizer, sets.block_size, sets.max_blocks)
    general_blocks = perplexity_blocks(sets.general_texts, tokenizer, sets.block_size, sets.max_blocks)
    if not domain_blocks or not general_blocks:
        raise ValueError("the held-out domain text or the general text is empty: no perplexity to measure")
    return domain_blocks, general_blocks


def evaluate_model(
    folder: Path,
    sets: EvalSets,
    max_new_tokens: int,
    batch_size: int,
    tokenizer_folder: Path | None = None,
    precision: str = "fp32",
) -> dict:
    """Every gate metric of one model folder (transformers weights in `precision`, or a GGUF file whose token ids
    are those of `tokenizer_folder`), with per-example scores."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    domain_blocks, general_blocks = blocks(sets, tokenizer)
    runtime = open_runtime(folder, batch_size=batch_size, n_ctx=N_CTX, precision=precision)
    # A served prompt can be longer than the gate's context (serve.n_ctx is a deployment's choice): its passages
    # are cut in the middle, as SFT cuts over-long records, rather than the gate failing.
    production_prompts = [fitted(tokenizer, item["messages"], N_CTX - max_new_tokens - 8) for item in sets.production]
    scores = {}
    try:
        golden = rag_replies(runtime, tokenizer, sets, sets.golden, max_new_tokens)
        unanswerable = rag_replies(runtime, tokenizer, sets, sets.unanswerable, max_new_tokens)
        if sets.abstention_scores:
            scores = {
                "golden_abstention_score": [r.continuation_logprob for r in golden],
                "abstention_score": [r.continuation_logprob for r in unanswerable],
            }
        closed_book = runtime.chat(sets.closed_book_conversations(), max_new_tokens) if sets.closed_book else []
        production = runtime.chat(production_prompts, max_new_tokens) if production_prompts else []
        probe_chats = [[{"role": "user", "content": p["prompt"]}] for p in sets.probes]
        probes = runtime.chat(probe_chats, max(p["max_tokens"] for p in sets.probes))
        domain_ppl = runtime.perplexity(domain_blocks)
        general_ppl = runtime.perplexity(general_blocks)
    finally:
        runtime.close()
    passed = {p["id"]: probe_passes(r.text, p["check"]) for r, p in zip(probes, sets.probes)}
    # Answer overlap is scored without the citation markers a reply ends with (a cited answer is not a longer one;
    # synth's references cite nothing, a relabeled served answer may); citations are scored on their own.
    golden_text = [strip_citations(r.text) for r in golden]
    categories = sorted({p["category"] for p in sets.probes})
    abstained = [float(abstains(r.text, sets.abstentions.values())) for r in unanswerable]
    per_example = {
        "golden_f1": [token_f1(t, i["answer"]) for t, i in zip(golden_text, sets.golden)],
        "closed_book_f1": [token_f1(strip_citations(r.text), i["answer"]) for r, i in zip(closed_book, sets.golden)],
        "production_f1": [
            token_f1(strip_citations(r.text), strip_citations(i["answer"])) for r, i in zip(production, sets.production)
        ],
        "golden_exact_match": [exact_match(t, i["answer"]) for t, i in zip(golden_text, sets.golden)],
        "golden_rouge_l": [rouge_l(t, i["answer"]) for t, i in zip(golden_text, sets.golden)],
        **citation_scores([r.text for r in golden], sets.golden),
        "golden_abstained": [float(abstains(r.text, sets.abstentions.values())) for r in golden],
        "abstained": abstained,
        "hallucinated": [1.0 - a for a in abstained],
        "capability": [float(passed[p["id"]]) for p in sets.probes if p["category"] != "format"],
        "format": [float(passed[p["id"]]) for p in sets.probes if p["category"] == "format"],
        **scores,  # mean log-probability of the abstention sentence as the reply: the abstention bound's risk score
    }
    tokens = sum(r.tokens for r in golden + unanswerable)
    seconds = sum(r.seconds for r in golden + unanswerable)
    return {
        "metrics": {
            # closed-book and production F1 only where measured: a 0 would read as a model that knows nothing
            **{m: _mean(per_example[k]) for m, k in PER_ITEM_METRICS.items() if per_example[k] or m not in OPTIONAL_METRICS},
            **{f"probes_{c}": _mean([passed[p["id"]] for p in sets.probes if p["category"] == c]) for c in categories},
            "citation_precision": citation_precision(per_example),
            "domain_perplexity": domain_ppl,
            "general_perplexity": general_ppl,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "scoring_seconds": time.perf_counter() - started,  # loading and every set: what the score cache saves
        },
        "per_example": per_example,
        "answers": {
            "golden": [r.text for r in golden],
            "closed_book": [r.text for r in closed_book],
            "unanswerable": [r.text for r in unanswerable],
            "production": [r.text for r in production],
        },
    }


def rag_replies(runtime, tokenizer, sets: EvalSets, items: list[dict], max_new_tokens: int) -> list:
    """Replies to the items' RAG prompts; with the abstention bound on, each also carries the mean log-probability
    of the abstention sentence (in its passages' language) as its reply, scored on the same pass over the prompt."""
    conversations = sets.conversations(items)
    sentences = [abstention_in(item["reply_lang"], sets.abstentions) for item in items]
    scored = reply_sequences(tokenizer, conversations, sentences) if sets.abstention_scores else None
    return runtime.chat(conversations, max_new_tokens, scored)


def citation_scores(replies: list[str], items: list[dict]) -> dict[str, list[float]]:
    """Per golden item: passages cited, cited passages that hold the answer, and whether one such was cited."""
    cited = [cited_numbers(reply, len(item["context"])) for reply, item in zip(replies, items)]
    supported = [len(numbers & set(item["supporting"])) for numbers, item in zip(cited, items)]
    return {
        "citations_made": [float(len(numbers)) for numbers in cited],
        "citations_supported": [float(n) for n in supported],
        "source_cited": [float(n > 0) for n in supported],
    }


def citation_precision(per_example: dict[str, list]) -> float:
    """Cited passages that hold the answer, over all passages cited on the golden set; 0 where nothing was cited
    (no citation gives a reader nothing to check)."""
    made = sum(per_example["citations_made"])
    return sum(per_example["citations_supported"]) / made if made else 0.0


def _mean(values: list) -> float:
    return float(sum(values) / len(values)) if values else 0.0
