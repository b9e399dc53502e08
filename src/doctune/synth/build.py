"""From filtered QA to the datasets: leak-free splits, SFT, DPO, eval sets and CPT text.

Splits are by source chunk (or document): eval chunks never feed training, not as answers, not as retrieved
context, not as CPT text. Contamination is then measured with word n-grams and must stay within its bound.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np

from doctune.chat import SYSTEM_PROMPT, abstention_in, conversation, edge_order, rag_user_message
from doctune.citations import chunk_passage, citation_suffix, cite, supporting_passages
from doctune.config import SynthConfig
from doctune.flywheel import Examples
from doctune.langid import passages_language
from doctune.retrieval import ChunkIndex
from doctune.synth.extractive import QA, SECTION_PATH, fold, section_key
from doctune.synth.filters import words
from doctune.synth.languages import language
from doctune.synth.replay import ReplayText


class ContaminationError(RuntimeError):
    """Golden items overlap training data beyond synth.max_contamination."""


def unit_fraction(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a key: splits and choices that never move between runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "big") / 2**64


def assign_splits(chunks: list[dict], config: SynthConfig, questions: Counter | None = None) -> dict[str, str]:
    """chunk_id -> eval | validation | train | heldout, decided per chunk or per document, in a seeded order.

    Eval units are taken until they hold synth.eval_fraction of the chunks and, when `questions` (kept questions per
    chunk) is given, until their answerable questions reach synth.min_golden (with a margin for the eval items
    later found in training text), at most synth.max_eval_fraction of the chunks and of the questions. Validation
    takes synth.validation_fraction of the questions from the units left. `heldout` chunks
    (synth.heldout_fraction of the training chunks, at least one) are seen by no training stage: not as CPT text,
    not as SFT/DPO questions or context. Their text measures perplexity before and after.
    """
    units: dict[str, list[str]] = {}
    for chunk in chunks:
        units.setdefault(chunk["chunk_id"] if config.split_by == "chunk" else chunk["doc_id"], []).append(chunk["chunk_id"])
    order = sorted(units, key=lambda unit: unit_fraction(config.seed, f"split|{unit}"))
    total, questions = max(1, len(chunks)), questions or Counter()
    all_questions = max(1, sum(questions.values()))
    wanted = 1.25 * config.min_golden / (1 - config.unanswerable_share) if questions else 0.0
    out, evaluated, asked = {}, 0, 0.0
    for unit in order:
        size, held = len(units[unit]), sum(questions[cid] for cid in units[unit])
        more = (
            asked < wanted
            and held
            and (evaluated + size) / total <= config.max_eval_fraction
            and (asked + held) / all_questions <= config.max_eval_fraction  # training keeps the rest of the questions
        )
        if evaluated / total < config.eval_fraction or more:
            evaluated, asked = evaluated + size, asked + held
            out.update(dict.fromkeys(units[unit], "eval"))
    # Validation: the next units, in the same order, that hold questions (a validation split without any would
    # leave SFT and DPO nothing to evaluate on), up to validation_fraction of the questions (of the chunks when
    # question counts are not given).
    validating = 0.0
    for unit in (u for u in order if units[u][0] not in out):
        held = sum(questions[cid] for cid in units[unit]) if questions else len(units[unit])
        share = validating / (all_questions if questions else total)
        split = "validation" if held and share < config.validation_fraction else "train"
        validating += held if split == "validation" else 0
        out.update(dict.fromkeys(units[unit], split))
    training = sorted((unit_fraction(config.seed, f"heldout|{cid}"), cid) for cid, s in out.items() if s == "train")
    if len(training) >= 2:
        held = [cid for u, cid in training if u < config.heldout_fraction] or [training[0][1]]
        for cid in held[: len(training) - 1]:
            out[cid] = "heldout"
    return out


def ngrams(text: str, n: int) -> set[int]:
    tokens = words(text)
    return {hash(" ".join(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}


def content_text(qa: QA) -> str:
    """What a QA item says, without template boilerplate that every item shares."""
    fields = qa.meta.get("fields") if qa.template >= 0 else None
    asked = " ".join(str(v) for v in fields.values()) if fields else qa.question
    return f"{asked} {qa.answer} {qa.evidence}"


@dataclass
class Datasets:
    sft: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "validation": []})
    dpo: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "validation": []})
    cpt: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)  # domain text no training stage sees: perplexity after training
    golden: list[dict] = field(default_factory=list)
    unanswerable: list[dict] = field(default_factory=list)
    production: list[dict] = field(default_factory=list)  # relabeled served failures, held out
    counts: Counter = field(default_factory=Counter)
    contamination_rate: float = 0.0


class Holders:
    """The chunks that state an item's evidence (its own chunk, and repeats of the text elsewhere)."""

    def __init__(self, chunks: list[dict]):
        self.by_id = {c["chunk_id"]: i for i, c in enumerate(chunks)}
        self.folded = [fold(c["text"]).lower() for c in chunks]

    def __call__(self, qa: QA) -> set[int]:
        evidence = fold(qa.evidence).lower()
        found = {self.by_id[qa.chunk_id]}
        if len(evidence) >= 12:
            found.update(i for i, text in enumerate(self.folded) if evidence in text)
        return found


OPEN_TYPES = {"section": "title", "topic": "title", "fact": "subject"}  # asked about: any passage on it answers


def _stem(word: str) -> str:
    return word[:5] if len(word) <= 6 else word[:6]  # "groups" -> "group", "process" -> "proces" (not "procedure")


def subject_named(qa: QA, passages: list[str]) -> bool:
    """Whether a passage names what an open question asks about ("What does the manual state about the teacher?"
    over a context that discusses the teacher): then the context does answer it, if not with the withheld span,
    and it is no abstention case. Questions about a specific fact (a definition, a value, an entry, steps) stay
    abstention cases when their subject is in context and the fact is not: the hard negatives. Named: every word
    of five letters or more of the subject found at a word start by its stem, or, where it has none, the subject
    itself, its article left out ("help", "mask", not "draw y axis" in "draw x axis"); a subject without a word of
    four letters or more (an acronym, "C++ API") is never named, so its item stays an abstention case."""
    key = OPEN_TYPES.get(qa.qtype)
    fields = qa.meta.get("fields", {}) if isinstance(qa.meta, dict) else {}
    if key is None or not fields.get(key) or not _asks_about(qa, key):
        return False
    subject = fold(str(fields[key])).lower()
    stems = {_stem(w) for w in re.findall(r"[^\W\d_]{5,}", subject)}
    patterns = [re.compile(rf"\b{re.escape(stem)}") for stem in stems]
    lang = language(qa.meta.get("lang", ""))
    words = [w for w in subject.split() if not (lang and w in lang.articles)]
    if not patterns and re.search(r"[^\W\d_]{4}", " ".join(words)):  # short words only: the phrase itself
        patterns = [re.compile(rf"(?<!\w){re.escape(' '.join(words))}(?!\w)")]
    return bool(patterns) and any(all(p.search(fold(text).lower()) for p in patterns) for text in passages)


def section_in_context(qa: QA, source: dict, passages: list[dict]) -> bool:
    """Whether a passage lies in the section a title question asks about ("What does the section X say?"): X
    itself, a subsection of X, or, where the question names X with its parent heading ("/media : Mount point for
    removable media › Purpose": "Purpose" alone names no subject), the parent or another of its subsections. Such
    a passage says what X is about, if not with the withheld span, so the question is no abstention case, even
    where it does not repeat the title's words."""
    fields = qa.meta.get("fields", {}) if isinstance(qa.meta, dict) else {}
    title, section = fields.get("title") or "", source.get("section") or ""
    if OPEN_TYPES.get(qa.qtype) != "title" or not title or not section or not _asks_about(qa, "title"):
        return False
    family = {section}
    parent = source.get("section_parent") or ""
    if parent and SECTION_PATH in title and section_key(parent) in fold(title).lower():
        family.add(parent)
    same_doc = [p for p in passages if p.get("doc_id") == source.get("doc_id")]
    return any((p.get("section") or "") in family or (p.get("section_parent") or "") in family for p in same_doc)


def _asks_about(qa: QA, key: str) -> bool:
    """Whether the question's phrasing asks about `key` (a fact question may name its section only to place it)."""
    lang = language(qa.meta.get("lang", ""))
    phrasings = lang.templates.get(qa.qtype, []) if lang else []
    return 0 <= qa.template < len(phrasings) and "{" + key + "}" in phrasings[qa.template]


class Builder:
    def __init__(self, config: SynthConfig, chunks: list[dict], index: ChunkIndex, top_k: int, questions: Counter):
        self.config = config
        self.chunks = chunks
        self.by_id = {c["chunk_id"]: i for i, c in enumerate(chunks)}
        self.holding = Holders(chunks)  # none of these may stand in an abstention context
        self.index = index
        self.top_k = top_k
        self.split = assign_splits(chunks, config, questions)
        self.counts: Counter = Counter()

    def retrieve(self, questions: list[str], allowed: Callable[[int], bool], exclude: list[set[int]]) -> list[list[int]]:
        """Top-k chunk indices per question among allowed chunks, minus each question's excluded ones."""
        if not questions:
            return []
        wanted = self.top_k + max(len(e) for e in exclude) if exclude else self.top_k
        indices, _ = self.index.search(questions, min(len(self.chunks), 4 * wanted + 8))
        out = []
        for row, skip in zip(indices, exclude):
            out.append([int(i) for i in row if allowed(int(i)) and int(i) not in skip][: self.top_k])
        return out

    def with_gold(self, ranked: list[int], gold: int, key: str) -> list[int]:
        """The retrieved chunks with the item's own chunk among them. Where retrieval missed it, it takes a
        seeded random rank (as in RAFT): always last would put it in the middle of every edge-ordered context,
        where a small model reads worst and where over-long prompts are cut."""
        if gold in ranked:
            return ranked
        kept = ranked[: self.top_k - 1]
        kept.insert(int(unit_fraction(self.config.seed, f"gold|{key}") * (len(kept) + 1)), gold)
        return kept

    def answered_in_context(self, qa: QA, context: list[int]) -> bool:
        """Whether an open question's context answers it without the withheld chunk: then it is no abstention case."""
        passages = [self.chunks[i] for i in context]
        source = self.chunks[self.by_id[qa.chunk_id]]
        return subject_named(qa, [p["text"] for p in passages]) or section_in_context(qa, source, passages)

    def abstention(self, ids: list[int]) -> str:
        """The abstention sentence in the language of the passages a prompt shows, `ids` in prompt order (as the
        gate and serving pick it)."""
        shown = [self.chunks[i] for i in ids]
        return abstention_in(passages_language([c.get("lang") for c in shown], [c["text"] for c in shown]))

    def passages(self, ids: list[int]) -> list[str]:
        return [chunk_passage(self.chunks[i]) for i in ids]

    def citations(self, qa: QA, shown: list[int]) -> list[int]:
        """The numbers of the shown passages (prompt order) an answer cites; none with synth.citations off."""
        if not self.config.citations:
            return []
        chunks = [self.chunks[i] for i in shown]
        return supporting_passages([c["chunk_id"] for c in chunks], [c["text"] for c in chunks], [qa.chunk_id], qa.evidence)

    # -- SFT -------------------------------------------------------------

    @staticmethod
    def chat(user: str, assistant: str, meta: dict) -> dict:
        messages = [*conversation(user, SYSTEM_PROMPT), {"role": "assistant", "content": assistant}]
        return {"messages": messages, "meta": meta}

    def sft_records(self, items: list[QA]) -> tuple[list[dict], list[dict]]:
        """(answerable, abstention) SFT records for one split's QA."""
        cfg = self.config
        trainable = lambda i: self.split[self.chunks[i]["chunk_id"]] in ("train", "validation")  # noqa: E731
        holds = [self.holding(qa) for qa in items]
        questions = [qa.question for qa in items]
        retrieved = self.retrieve(questions, trainable, [set() for _ in items])
        without = self.retrieve(questions, trainable, holds)
        answerable, abstaining = [], []
        for qa, ranked, distractors, held in zip(items, retrieved, without, holds):
            base = {"chunk_id": qa.chunk_id, "qtype": qa.qtype, "question": qa.question, "evidence": qa.evidence}
            gold = self.by_id[qa.chunk_id]
            if unit_fraction(cfg.seed, f"rag|{qa.question}|{qa.chunk_id}") < cfg.rag_share:
                shown = edge_order(self.with_gold(ranked, gold, f"{qa.question}|{qa.chunk_id}"))
                ids = [self.chunks[i]["chunk_id"] for i in shown]
                user = rag_user_message(qa.question, self.passages(shown))
                cited = self.citations(qa, shown)
                meta = {**base, "form": "rag", "context_chunk_ids": ids, "cited": cited}
                answerable.append(self.chat(user, cite(qa.answer, cited), meta))
            else:
                answerable.append(self.chat(qa.question, qa.answer, {**base, "form": "closed_book"}))
            if distractors and self.answered_in_context(qa, distractors):
                self.counts["sft_abstention_subject_in_context"] += 1
            elif distractors and not held & set(distractors):
                ids = [self.chunks[i]["chunk_id"] for i in distractors]
                user = rag_user_message(qa.question, edge_order(self.passages(distractors)))
                meta = {**base, "form": "abstention", "context_chunk_ids": edge_order(ids), "withheld_answer": qa.answer}
                abstaining.append(self.chat(user, self.abstention(edge_order(distractors)), meta))
        wanted = round(cfg.abstention_share / (1 - cfg.abstention_share) * len(answerable))
        abstaining.sort(key=lambda r: unit_fraction(cfg.seed, f"abstain|{r['meta']['question']}|{r['meta']['chunk_id']}"))
        return answerable, abstaining[:wanted]

    # -- DPO -------------------------------------------------------------

    def dpo_pairs(self, records: list[dict], pool: list[QA]) -> tuple[list[dict], Counter]:
        """One preference pair per SFT record: chosen is the SFT reply, rejected a plausible wrong one."""
        by_chunk: dict[str, list[QA]] = {}
        by_type: dict[str, list[QA]] = {}
        for qa in pool:
            by_chunk.setdefault(qa.chunk_id, []).append(qa)
            by_type.setdefault(qa.qtype, []).append(qa)
        capitals = sorted({w for qa in pool for w in re.findall(r"\b[A-Z][a-z]{3,}\b", qa.answer)})
        strategies = Counter()
        pairs = []
        over_abstention = self.config.abstention_share / (1 - self.config.abstention_share)
        for record in records:
            meta = record["meta"]
            prompt, chosen = record["messages"][:2], record["messages"][2]["content"]
            key = f"{meta['question']}|{meta['chunk_id']}"
            # A wrong answer cites as the right one does: the pair differs in what it says, not in whether it cites.
            suffix = citation_suffix(meta.get("cited", []))
            if meta["form"] == "abstention":
                strategy, rejected = "unsupported_answer", meta["withheld_answer"]
            elif meta["form"] == "rag" and unit_fraction(self.config.seed, f"over|{key}") < over_abstention:
                # The mirror of unsupported_answer, on a similar number of pairs: the same kind of prompt, its
                # answer in context this time, so preference training teaches when to abstain, not only how.
                shown = [self.by_id[i] for i in meta["context_chunk_ids"]]
                strategy, rejected = "needless_abstention", self.abstention(shown)
            else:
                strategy, rejected = self._rejected(chosen.removesuffix(suffix), meta, by_chunk, by_type, capitals, key)
                rejected = None if rejected is None else cite(rejected, meta.get("cited", []))
            if rejected is None or fold(rejected) == fold(chosen):
                strategies["no_rejected_found"] += 1
                continue
            strategies[strategy] += 1
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "meta": {**{k: v for k, v in meta.items() if k != "withheld_answer"}, "strategy": strategy},
                }
            )
        return pairs, strategies

    def _rejected(self, chosen, meta, by_chunk, by_type, capitals, key) -> tuple[str, str | None]:
        seed = self.config.seed
        order = ["other_chunk", "altered", "other_question"]
        start = int(unit_fraction(seed, f"strategy|{key}") * len(order))
        for strategy in order[start:] + order[:start]:
            if strategy == "altered":
                altered = alter(chosen, capitals, unit_fraction(seed, f"alter|{key}"))
                if altered:
                    return strategy, altered
            elif strategy == "other_question":
                others = [qa.answer for qa in by_chunk.get(meta["chunk_id"], []) if fold(qa.answer) != fold(chosen)]
                if others:
                    return strategy, others[int(unit_fraction(seed, f"oq|{key}") * len(others))]
            else:
                others = [qa.answer for qa in by_type.get(meta["qtype"], []) if qa.chunk_id != meta["chunk_id"]]
                if others:
                    return strategy, others[int(unit_fraction(seed, f"oc|{key}") * len(others))]
        return "none", None

    # -- eval ------------------------------------------------------------

    def eval_items(self, items: list[QA]) -> tuple[list[dict], list[dict]]:
        everything = lambda i: True  # noqa: E731  (serving retrieves over the whole corpus)
        holds = [self.holding(qa) for qa in items]
        questions = [qa.question for qa in items]
        ranked_all = self.retrieve(questions, everything, [set() for _ in items])
        distractors_all = self.retrieve(questions, everything, holds)
        golden, unanswerable = [], []
        for qa, ranked, distractors in zip(items, ranked_all, distractors_all):
            chunk = self.chunks[self.by_id[qa.chunk_id]]
            meta = {"qtype": qa.qtype, "evidence": qa.evidence, "doc_id": chunk["doc_id"], "lang": chunk.get("lang", "und")}
            meta["source"] = chunk.get("source", "")
            drawn = unit_fraction(self.config.seed, f"unanswerable|{qa.question}|{qa.chunk_id}") < self.config.unanswerable_share
            if drawn and distractors and self.answered_in_context(qa, distractors):
                self.counts["unanswerable_subject_in_context"] += 1  # answerable after all: golden
            elif drawn:
                if distractors:
                    ids = [self.chunks[i]["chunk_id"] for i in distractors]
                    unanswerable.append(
                        {"question": qa.question, "answer": self.abstention(edge_order(distractors)), "chunk_ids": [qa.chunk_id],
                         "answerable": False,
                         "meta": {**meta, "context_chunk_ids": edge_order(ids), "withheld_answer": qa.answer}}
                    )  # fmt: skip
                continue
            gold = self.by_id[qa.chunk_id]
            ranked = self.with_gold(ranked, gold, f"{qa.question}|{qa.chunk_id}")
            ids = [self.chunks[i]["chunk_id"] for i in ranked]
            golden.append(
                {"question": qa.question, "answer": qa.answer, "chunk_ids": [qa.chunk_id], "answerable": True,
                 "meta": {**meta, "context_chunk_ids": edge_order(ids)}}
            )  # fmt: skip
        return golden, unanswerable


def alter(answer: str, capitals: list[str], u: float) -> str | None:
    """The answer with a number changed or a name swapped for another from the corpus; None if it has neither."""
    numbers = list(re.finditer(r"\d+(?:\.\d+)?", answer))
    if numbers:
        m = numbers[int(u * len(numbers))]
        value = m.group(0)
        if "." in value:
            whole, frac = value.split(".")
            changed = f"{whole}.{(int(frac) + 1 + int(u * 7)) % 10 ** len(frac):0{len(frac)}d}"
        else:
            number = int(value)  # near the truth is what makes a wrong number plausible
            changed = str(number + 1 + int(u * max(8, number // 10)))
        return answer[: m.start()] + changed + answer[m.end() :]
    names = [m for m in re.finditer(r"\b[A-Z][a-z]{3,}\b", answer) if m.start() > 0]
    if names and capitals:
        m = names[int(u * len(names))]
        candidates = [c for c in capitals if c != m.group(0)]
        if candidates:
            return answer[: m.start()] + candidates[int(u * len(candidates))] + answer[m.end() :]
    return None


def build(
    config: SynthConfig,
    chunks: list[dict],
    qas: list[QA],
    index: ChunkIndex,
    top_k: int,
    replay: list[ReplayText],
    judge: Callable[[str, str, str], str | None] | None = None,
    flywheel: Examples | None = None,
) -> Datasets:
    builder = Builder(config, chunks, index, top_k, Counter(qa.chunk_id for qa in qas))
    out = Datasets()
    counts = out.counts
    pools: dict[str, list[QA]] = {"train": [], "validation": [], "eval": [], "heldout": []}  # heldout: unused
    for qa in qas:
        pools[builder.split[qa.chunk_id]].append(qa)
    counts.update({f"chunks_{name}": sum(1 for s in builder.split.values() if s == name) for name in pools})

    for name in ("train", "validation"):
        answerable, abstaining = builder.sft_records(pools[name])
        out.sft[name] = sorted(
            answerable + abstaining, key=lambda r: unit_fraction(config.seed, "order|" + r["meta"]["question"])
        )
        pairs, strategies = builder.dpo_pairs(out.sft[name], pools[name])
        counts.update({f"dpo_{name}_{k}": v for k, v in strategies.items()})
        if judge is not None:
            pairs = judged(pairs, judge, counts, name)
        out.dpo[name] = pairs
    counts["sft_abstention"] = sum(r["meta"]["form"] == "abstention" for split in out.sft.values() for r in split)
    chats = rehearsal_records(replay, config.replay.sft_share, len(out.sft["train"]), counts)
    if chats:
        out.sft["train"] = sorted(
            out.sft["train"] + chats, key=lambda r: unit_fraction(config.seed, "order|" + r["meta"]["question"])
        )

    # CPT text: the training chunks, in document order, plus replay; the held-out chunks measure perplexity.
    def texts(*splits: str) -> list[dict]:
        return [{"text": c["text"], "source": "domain"} for c in chunks if builder.split[c["chunk_id"]] in splits]

    trained, out.heldout = texts("train", "validation"), texts("heldout")
    domain = trained + out.heldout
    out.cpt = trained + replay_records(replay, sum(len(r["text"]) for r in trained), config.replay.share, counts)

    golden, unanswerable = builder.eval_items(pools["eval"])
    counts.update(builder.counts)
    # Held-out content that recurs in training (repeated pages, boilerplate, the same fact in two chunks)
    # is not held out: drop those eval items, counted in the report.
    n = config.ngram
    eval_qa = {(qa.question, qa.chunk_id): qa for qa in pools["eval"]}
    grams = lambda item: ngrams(content_text(eval_qa[(item["question"], item["chunk_ids"][0])]), n)  # noqa: E731
    seen = set().union(
        *(ngrams(r["text"], n) for r in domain), *(ngrams(content_text(qa), n) for qa in pools["train"] + pools["validation"])
    )
    for name, items in (("golden", golden), ("unanswerable", unanswerable)):
        kept = [item for item in items if not grams(item) & seen]
        counts[f"{name}_dropped_seen_in_training"] = len(items) - len(kept)
        setattr(out, name, kept)

    if flywheel is not None:
        add_flywheel(out, flywheel, set().union(*(grams(item) for item in out.golden + out.unanswerable)), n, config.seed)

    # The check: n-gram overlap between eval items and every training record as written.
    training: set[int] = set()
    for record in out.cpt:
        training |= ngrams(record["text"], n)
    for split in ("train", "validation"):
        for record in out.sft[split]:
            training |= ngrams(" ".join(m["content"] for m in record["messages"]), n)
        for pair in out.dpo[split]:
            # Not the rejected reply: what DPO pushes away from cannot leak an answer, and an altered number can make
            # a rejected sentence coincide with an eval sentence.
            training |= ngrams(" ".join(m["content"] for key in ("prompt", "chosen") for m in pair[key]), n)
    items = out.golden + out.unanswerable
    contaminated = sum(1 for item in items if grams(item) & training)
    out.contamination_rate = contaminated / len(items) if items else 0.0
    counts["eval_contaminated"] = contaminated
    total = len(items)
    shared = {item["chunk_ids"][0] for item in out.golden + out.unanswerable} & {
        r["meta"].get("chunk_id") for split in out.sft.values() for r in split
    }
    if shared:  # cannot happen by construction; a bug here must not ship a leaky eval
        raise ContaminationError(f"eval items share source chunks with SFT items: {sorted(shared)[:5]}")
    if out.contamination_rate > config.max_contamination:
        raise ContaminationError(
            f"{contaminated} of {total} eval items share {config.ngram}-grams with training data "
            f"(rate {out.contamination_rate:.4f} > synth.max_contamination {config.max_contamination})"
        )
    return out


def add_flywheel(out: Datasets, made: Examples, eval_grams: set[int], n: int, seed: int) -> None:
    """Relabeled served failures and rated-up answers into the training split, the held-out ones as the production
    set. A served question is answered from passages of the whole corpus: a record sharing an n-gram with an eval
    item would leak it, so it is dropped (counted) rather than trained on."""

    def clean(texts: list[str]) -> bool:
        return not ngrams(" ".join(texts), n) & eval_grams

    sft = [r for r in made.sft if clean([m["content"] for m in r["messages"]])]
    dpo = [p for p in made.dpo if clean([m["content"] for key in ("prompt", "chosen") for m in p[key]])]
    out.counts.update({f"flywheel_{k}": v for k, v in made.counts.items()})
    out.counts["flywheel_sft_dropped_eval_overlap"] = len(made.sft) - len(sft)
    out.counts["flywheel_dpo_dropped_eval_overlap"] = len(made.dpo) - len(dpo)
    out.sft["train"] = sorted(out.sft["train"] + sft, key=lambda r: unit_fraction(seed, "order|" + r["meta"]["question"]))
    out.dpo["train"] += dpo
    out.production = made.production


def replay_records(texts: list[ReplayText], domain_chars: int, share: float, counts: Counter) -> list[dict]:
    """Replay text reaching `share` of CPT characters; repeated whole when there is less (counted)."""
    if share <= 0 or not texts:
        return []
    wanted = share / (1 - share) * domain_chars
    have = sum(len(t.text) for t in texts)
    repeats = max(1, int(np.ceil(wanted / have)))
    records, total = [], 0
    for _ in range(repeats):
        for text in texts:
            if total >= wanted:
                break
            records.append({"text": text.text, "source": "replay"})
            total += len(text.text)
    counts["replay_texts"] = len(texts)
    counts["replay_repeats"] = repeats
    return records


def rehearsal_records(texts: list[ReplayText], share: float, domain_examples: int, counts: Counter) -> list[dict]:
    """The base model's own replies to general prompts as SFT chats, `share` of the training examples, verified
    structured-output replies and general ones taking turns. Asked without the documentation system prompt, as
    general use (and the capability probes) ask. Texts of a user's replay dataset are not chats and are left out."""
    chats = [t for t in texts if t.prompt and t.reply.strip()]
    structured, general = [t for t in chats if t.structured], [t for t in chats if not t.structured]
    chats = [t for pair in zip_longest(structured, general) for t in pair if t is not None]  # both kinds at any share
    wanted = min(len(chats), round(share / (1 - share) * domain_examples)) if share > 0 else 0
    records = []
    for text in chats[:wanted]:
        messages = [{"role": "user", "content": text.prompt}, {"role": "assistant", "content": text.reply.strip()}]
        records.append({"messages": messages, "meta": {"form": "rehearsal", "question": text.prompt}})
    counts["sft_rehearsal"] = len(records)
    counts["sft_rehearsal_structured"] = sum(t.structured for t in chats[:wanted])
    return records


def judged(
    pairs: list[dict], judge: Callable[[str, str, str], str | None], counts: Counter, split: str | None = None
) -> list[dict]:
    """Keep pairs whose judge verdicts agree in both orders (A/B swapped) that chosen is better. With `split`, the
    counts are also kept per split (judge_<split>_pairs, _kept, _disagreed, _prefers_rejected): the stage refuses a
    judge that keeps no training pair."""
    kept = []
    for pair in pairs:
        question = pair["prompt"][-1]["content"]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        first, second = judge(question, chosen, rejected), judge(question, rejected, chosen)
        if first is None or second is None or (first == "A") != (second == "B"):
            verdict = "disagreed"
        elif first == "B":
            verdict = "prefers_rejected"
        else:
            verdict = "kept"
            kept.append(pair)
        if verdict != "kept":
            counts[f"judge_{verdict}"] += 1
        if split is not None:
            counts[f"judge_{split}_{verdict}"] += 1
    if split is not None:
        counts[f"judge_{split}_pairs"] += len(pairs)
        counts[f"judge_{split}_kept"] += 0  # present (as 0) when nothing is kept
    return kept
