"""The synth stage: chunks -> QA (teacher) -> filters -> cpt, sft, dpo, golden, unanswerable, with a report."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from doctune import flywheel
from doctune.artifacts import ArtifactRef
from doctune.cache import Cache
from doctune.chat import ABSTENTIONS, SYSTEM_PROMPT
from doctune.code_digest import code_digest
from doctune.config import RunConfig
from doctune.langid import language_probabilities
from doctune.records import (
    ABSTENTIONS_FILE,
    CHUNKS_FILE,
    GOLDEN_FILE,
    HELDOUT_FILE,
    PAGES_FILE,
    PRODUCTION_FILE,
    SYNTH_REPORT_FILE,
    SYSTEM_PROMPT_FILE,
    TRAIN_FILE,
    UNANSWERABLE_FILE,
    UNSOURCED_FORMS,
    read_parquet,
    write_jsonl,
)
from doctune.redact import redact_obj
from doctune.retrieval import ChunkIndex, retrieval_mode
from doctune.synth import filters
from doctune.synth.build import Datasets, Holders, build
from doctune.synth.extractive import QA, name_sections
from doctune.synth.languages import LANGUAGES, language_name
from doctune.synth.replay import replay_texts
from doctune.synth.teachers import EndpointTeacher, generate, make_teacher
from doctune.tracking import StageRun


class SynthError(RuntimeError):
    """Nothing to generate from, or nothing left after filtering."""


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """What serving logged and people labeled is an input too, and how it is used: new logs, labels or flywheel
    settings make a new dataset."""
    settings = config.flywheel.model_dump(mode="json", exclude={"log_dir", "labels_dir"})
    return {"flywheel": flywheel.sources_digest(config), "flywheel_settings": json.dumps(settings, sort_keys=True)}


def check_judged(data: Datasets) -> None:
    """A pairwise judge that kept none of the training split's DPO pairs is refused: an empty DPO set would only
    fail later, in the DPO stage, far from its cause."""
    counts = data.counts
    pairs = counts.get("judge_train_pairs", 0)
    if pairs and not [p for p in data.dpo["train"] if p["meta"].get("form") not in UNSOURCED_FORMS]:
        disagreed, rejected = counts.get("judge_train_disagreed", 0), counts.get("judge_train_prefers_rejected", 0)
        raise SynthError(
            f"the pairwise judge kept 0 of {pairs} DPO pairs of the training split ({disagreed} disagreed between "
            f"orders, {rejected} preferred the rejected answer); check the judge model (synth.endpoint) or set "
            f"synth.judge=false"
        )


def apply_filters(
    qas: list[QA], config: RunConfig, lang_of: dict[str, str], index: ChunkIndex, holders: Holders
) -> tuple[list[QA], dict, dict]:
    """The kept questions, what each filter dropped, and per question type: generated, kept, specificity."""
    cfg = config.synth
    counts = {"generated": len(qas)}
    types: dict[str, Counter] = {}
    for qa in qas:
        types.setdefault(qa.qtype, Counter())["generated"] += 1
    steps = [
        ("language", lambda items: filters.language_filter(items, lambda cid: lang_of.get(cid, "und"), cfg.languages)),
        (
            "answer_language",
            lambda items: filters.answer_language_filter(
                items,
                lambda cid: lang_of.get(cid, "und"),
                language_probabilities,
                {code: lang.function_words for code, lang in LANGUAGES.items()},
            ),
        ),
        ("not_self_contained", filters.self_contained_filter),
        ("answer_form", filters.answer_form_filter),
        ("exact_duplicate", filters.exact_dedup),
        (
            "near_duplicate_minhash",
            lambda items: filters.minhash_dedup(items, cfg.dedup.minhash_threshold, cfg.dedup.minhash_permutations),
        ),
        (
            "near_duplicate_embedding",
            lambda items: filters.embedding_dedup(
                items, index.query_vectors([q.question for q in items]), cfg.dedup.embedding_threshold
            ),
        ),
        ("length", filters.length_filter),
        ("label_leakage", filters.leakage_filter),
    ]
    for name, step in steps:
        kept = step(qas)
        counts[f"dropped_{name}"] = len(qas) - len(kept)
        qas = kept
    # Specificity: asked alone, the question must find a chunk that holds its answer.
    ranked = index.search([qa.question for qa in qas], cfg.specificity_k)[0].tolist() if qas else []
    flags = filters.specific(qas, ranked, holders)
    for qa, ok in zip(qas, flags):
        types[qa.qtype]["checked"] += 1
        types[qa.qtype]["specific"] += ok
    counts["dropped_not_specific"] = flags.count(False)
    qas = [qa for qa, ok in zip(qas, flags) if ok]
    counts["kept"] = len(qas)
    for qa in qas:
        types[qa.qtype]["kept"] += 1
    per_type = {
        qtype: {
            "generated": c["generated"],
            "kept": c["kept"],
            "specificity": round(c["specific"] / c["checked"], 4) if c["checked"] else None,
            "answer_words": _spread([len(filters.words(qa.answer)) for qa in qas if qa.qtype == qtype]),
        }
        for qtype, c in sorted(types.items())
    }
    return qas, counts, per_type


def _with_splits(per_type: dict, data: Datasets) -> dict:
    """Per question type, also its SFT records (answerable and abstaining) and golden items."""
    sourced = [r for split in data.sft.values() for r in split if r["meta"]["form"] not in UNSOURCED_FORMS]
    sft = Counter(r["meta"].get("qtype") for r in sourced)
    golden = Counter(item["meta"].get("qtype") for item in data.golden)
    return {qtype: {**row, "sft": sft[qtype], "golden": golden[qtype]} for qtype, row in per_type.items()}


def documents_report(
    pages: list[dict],
    chunks: list[dict],
    generated: list[QA],
    kept: list[QA],
    data: Datasets,
    refused: dict[str, str],
    languages: list[str] | None,
) -> list[dict]:
    """One row per document: its language, how many chunks, questions generated and kept, golden items, and why
    it produced nothing when it did not."""
    doc_of = {c["chunk_id"]: c["doc_id"] for c in chunks}
    per_doc: dict[str, Counter] = {}
    for name, items in (("generated", generated), ("kept", kept)):
        for qa in items:
            per_doc.setdefault(doc_of.get(qa.chunk_id, ""), Counter())[name] += 1
    for item in data.golden:
        per_doc.setdefault(item["meta"].get("doc_id", ""), Counter())["golden"] += 1
    rows = []
    sources = {}
    for page in pages:
        sources.setdefault(page["doc_id"], (page.get("source", ""), page.get("lang", "und")))
    for doc_id, (source, lang) in sources.items():
        c = per_doc.get(doc_id, Counter())
        n_chunks = sum(1 for chunk in chunks if chunk["doc_id"] == doc_id)
        reason = ""
        if languages is not None and lang not in languages:
            reason = f"language {language_name(lang)} ({lang}) is not in synth.languages"
        elif doc_id in refused:
            reason = refused[doc_id]
        elif not n_chunks:
            reason = "no chunks (no text extracted)"
        elif not c["generated"]:
            reason = "no question could be built from its text (no definitions, entries, lists, notes or titled sections)"
        elif not c["kept"]:
            reason = "every question was filtered out (see the filters table)"
        rows.append({"doc_id": doc_id, "source": source, "lang": lang, "chunks": n_chunks, "generated": c["generated"],
                     "kept": c["kept"], "golden": c["golden"], "reason": reason})  # fmt: skip
    return rows


def _spread(values: list[int]) -> dict:
    if not values:
        return {}
    p = np.percentile(values, [5, 50, 95])
    return {"n": len(values), "p5": int(p[0]), "p50": int(p[1]), "p95": int(p[2]), "max": int(max(values))}


def report(data: Datasets, filter_counts: dict, teacher_counts: Counter, teacher: str) -> dict:
    sft_all = [r for r in data.sft["train"] + data.sft["validation"] if r["meta"]["form"] not in UNSOURCED_FORMS]
    abstaining = sum(r["meta"]["form"] == "abstention" for r in sft_all)
    forms = Counter(r["meta"]["form"] for r in data.sft["train"] + data.sft["validation"])
    return {
        "teacher": teacher,
        "filters": filter_counts,
        "teacher_counts": dict(teacher_counts),
        "datasets": {
            "cpt": len(data.cpt),
            "cpt_replay": sum(r["source"] == "replay" for r in data.cpt),
            "heldout": len(data.heldout),
            "sft_train": len(data.sft["train"]),
            "sft_validation": len(data.sft["validation"]),
            "dpo_train": len(data.dpo["train"]),
            "dpo_validation": len(data.dpo["validation"]),
            "golden": len(data.golden),
            "unanswerable": len(data.unanswerable),
            "production": len(data.production),
        },
        "sft_forms": dict(forms),
        "abstention_share": round(abstaining / len(sft_all), 4) if sft_all else 0.0,
        "replay_share": round(
            sum(len(r["text"]) for r in data.cpt if r["source"] == "replay") / max(1, sum(len(r["text"]) for r in data.cpt)), 4
        ),
        "contamination_rate": data.contamination_rate,
        "build": dict(data.counts),
        "lengths_chars": {
            "sft_question": _spread([len(r["meta"]["question"]) for r in sft_all]),
            "sft_answer": _spread([len(r["messages"][2]["content"]) for r in sft_all]),
            "cpt_text": _spread([len(r["text"]) for r in data.cpt]),
            "golden_answer": _spread([len(r["answer"]) for r in data.golden]),
        },
        "examples": {
            "sft": [r["messages"][1:] for r in sft_all[:3]],
            "dpo": [
                {k: p[k] for k in ("chosen", "rejected")} | {"strategy": p["meta"].get("strategy", p["meta"]["form"])}
                for p in data.dpo["train"][:3]
            ],
            "golden": [{k: g[k] for k in ("question", "answer")} for g in data.golden[:3]],
            "unanswerable": [{k: g[k] for k in ("question", "answer")} for g in data.unanswerable[:3]],
        },
    }


def report_markdown(rep: dict) -> str:
    lines = [f"# Synthetic data report (teacher: {rep['teacher']})", "", "## Filters", "", "| step | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rep["filters"].items()]
    lines += ["", "## Datasets", "", "| dataset | records |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rep["datasets"].items()]
    lines += [
        "",
        f"Abstention share of SFT: {rep['abstention_share']:.3f}; replay share of CPT characters: {rep['replay_share']:.3f}; "
        f"golden/training contamination rate: {rep['contamination_rate']:.4f}.",
        "",
        "## Lengths (characters)",
        "",
        "| field | n | p5 | p50 | p95 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v.get('n', 0)} | {v.get('p5', '')} | {v.get('p50', '')} | {v.get('p95', '')} | {v.get('max', '')} |"
        for k, v in rep["lengths_chars"].items()
    ]
    if "question_types" in rep:
        lines += [
            "",
            "## Question types",
            "",
            "Specificity: share of the questions that, asked alone, retrieve a chunk holding their answer among the top "
            f"{rep.get('specificity_k', 5)} ({rep['retrieval']['mode']} retrieval: {rep['retrieval']['why']}); the others "
            "are dropped.",
            "",
            "| type | generated | kept | specificity | answer words p5 / p50 / p95 | SFT | golden |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for qtype, row in rep["question_types"].items():
            w = row["answer_words"]
            spread = f"{w['p5']} / {w['p50']} / {w['p95']}" if w else ""
            spec = "" if row["specificity"] is None else f"{row['specificity']:.2f}"
            lines.append(f"| {qtype} | {row['generated']} | {row['kept']} | {spec} | {spread} | {row['sft']} | {row['golden']} |")
    if "documents" in rep:
        lines += ["", "## Documents", "", "| file | language | chunks | generated | kept | golden | why nothing |",
                  "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for row in rep["documents"]:
            lines.append(
                f"| {row['source']} | {row['lang']} | {row['chunks']} | {row['generated']} | {row['kept']} | "
                f"{row['golden']} | {row['reason']} |"
            )
    fly = rep.get("flywheel") or {}
    if fly.get("interactions"):
        window = " to ".join(fly["window"]) if fly.get("window") else ""
        lines += ["", "## Flywheel: what serving logged", "",
                  f"{fly['interactions']} answered requests read from {fly['log_dir']} ({window}); positive share of the "
                  f"flywheel's SFT records: {fly['positive_share'] if fly['positive_share'] is not None else 'none'}.",
                  "", "| count | value |", "|---|---:|"]  # fmt: skip
        lines += [f"| {k} | {v} |" for k, v in sorted(fly["counts"].items())]
        if fly["queued"]:
            lines += ["", "Waiting for a label (raw/flywheel/labeling_queue.json, a Label Studio import):", ""]
            lines += [f"- {q['question'][:120]} ({', '.join(q['reasons'])})" for q in fly["queued"]]
        if fly["skipped"]:
            lines += ["", f"Skipped ({len(fly['skipped'])}):", ""]
            lines += [
                f"- {s['file']}" + (f" line {s['line']}" if s.get("line") else "") + f": {s['reason']}"
                for s in fly["skipped"][:20]
            ]
    lines += ["", "## Build counts", "", "| count | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(rep["build"].items())]
    lines += ["", "## Examples", "", "```json", json.dumps(rep["examples"], indent=1, ensure_ascii=False)[:6000], "```"]
    return "\n".join(lines) + "\n"


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    cfg = config.synth
    cache = config.project.workdir / "cache"
    chunks_dir = tracker.fetch(inputs["chunks"])
    chunks = read_parquet(chunks_dir / CHUNKS_FILE)
    if not chunks:
        raise SynthError(
            f"no chunks in {inputs['chunks'].artifact_path} of run {inputs['chunks'].run_id}: nothing to generate from"
        )
    pages = read_parquet(tracker.fetch(inputs["pages"]) / PAGES_FILE)
    doc_lang = {p["doc_id"]: p["lang"] or "und" for p in pages}
    doc_source = {p["doc_id"]: p.get("source", "") for p in pages}
    # Teachers write in the document's language; eval items name their file.
    # label_lang: passage labels as the gate and serving write them, from the chunks file (English in chunks ingested
    # before chunks carried their language).
    chunks = [
        {
            **c,
            "lang": doc_lang.get(c["doc_id"], "und"),
            "label_lang": c.get("lang") or "en",
            "source": doc_source.get(c["doc_id"], ""),
        }
        for c in chunks
    ]
    chunks = name_sections(chunks)  # "Purpose" under every directory: questions name which one
    lang_of = {c["chunk_id"]: c["lang"] for c in chunks}
    tracker.log_dataset_input(inputs["chunks"], chunks_dir / CHUNKS_FILE, context="synth")

    teacher = make_teacher(cfg, cache)
    refused = {doc: why for doc, lang in doc_lang.items() if (why := teacher.handles(lang))}
    for doc, why in refused.items():
        source = next((p.get("source", doc) for p in pages if p["doc_id"] == doc), doc)
        print(f"synth: {source}: no questions: {why}", flush=True)
    settings = cfg.model_dump(mode="json", include={"teacher", "endpoint", "local", "min_questions", "max_questions"})
    settings["endpoint"].pop("api_key_env", None)
    # Resume only what the same chunks, settings and code started: a code fix must not reuse stale output.
    key = hashlib.sha256(
        json.dumps([inputs["chunks"].digest, settings, code_digest(__name__)], sort_keys=True).encode()
    ).hexdigest()[:24]
    concurrency = cfg.endpoint.max_concurrency if cfg.teacher == "endpoint" else 1
    checkpoint = Cache(cache).entry("synth", key) / "generated.jsonl"
    qas, exchanges, teacher_counts = generate(teacher, chunks, checkpoint, concurrency)

    mode, mode_reason = retrieval_mode(config.retrieval.mode, config.retrieval.embedding_model, set(lang_of.values()) - {"und"})
    index = ChunkIndex([c["text"] for c in chunks], config.retrieval.embedding_model, cache, mode=mode)
    kept, filter_counts, per_type = apply_filters(qas, config, lang_of, index, Holders(chunks))
    if not kept:
        raise SynthError(f"all {len(qas)} generated questions were filtered out ({filter_counts})")
    replay = replay_texts(config.model.base_model, cfg.replay, cache, cfg.seed)
    judge = teacher.judge if cfg.judge and isinstance(teacher, EndpointTeacher) else None
    if cfg.judge and judge is None:
        raise SynthError("synth.judge needs synth.teacher=endpoint: the judge is asked through the teacher endpoint")
    fly = flywheel.collect(config)
    made = flywheel.examples(fly, config, cfg.seed)
    for line in fly.skipped[:20]:
        print(f"synth: flywheel: {line['file']}" + (f" line {line['line']}" if line.get("line") else "") + f": {line['reason']}")
    data = build(cfg, chunks, kept, index, config.retrieval.top_k, replay, judge, made)
    check_judged(data)  # whether DPO runs is not part of synth's cache key: its result must serve both
    if not data.heldout:
        raise SynthError(
            f"no domain text could be held out for perplexity ({data.counts.get('chunks_train', 0)} training chunk(s); "
            "two or more are needed): quantize and the gate measure on it. Give the corpus more text."
        )
    rep = report(data, filter_counts, teacher_counts, cfg.teacher)
    rep["retrieval"] = {"mode": mode, "why": mode_reason}
    rep["question_types"] = _with_splits(per_type, data)
    rep["documents"] = documents_report(pages, chunks, qas, kept, data, refused, cfg.languages)
    rep["specificity_k"] = cfg.specificity_k
    rep["flywheel"] = flywheel.report(fly, made) | {"log_dir": str(flywheel.log_dir(config))}
    rep["examples"]["by_type"] = {
        qtype: [{"question": qa.question, "answer": qa.answer} for qa in kept if qa.qtype == qtype][:2]
        for qtype in rep["question_types"]
    }
    tracker.log_metrics(
        {f"filter.{k}": v for k, v in filter_counts.items()}
        | {f"records.{k}": v for k, v in rep["datasets"].items()}
        | {
            "abstention_share": rep["abstention_share"],
            "contamination_rate": rep["contamination_rate"],
            "replay_share": rep["replay_share"],
        }
    )

    outputs = {}
    with tempfile.TemporaryDirectory(prefix="doctune-synth-") as tmp:
        out = Path(tmp)
        for split in ("train", "validation"):
            write_jsonl(out / "sft" / f"{split}.jsonl", data.sft[split])
            write_jsonl(out / "dpo" / f"{split}.jsonl", data.dpo[split])
        write_jsonl(out / "cpt" / TRAIN_FILE, data.cpt)
        write_jsonl(out / "heldout" / HELDOUT_FILE, data.heldout)
        write_jsonl(out / "golden" / GOLDEN_FILE, data.golden)
        write_jsonl(out / "unanswerable" / UNANSWERABLE_FILE, data.unanswerable)
        if data.production:
            write_jsonl(out / "golden" / PRODUCTION_FILE, data.production)
        for name in ("sft", "dpo", "golden", "unanswerable"):
            (out / name / SYSTEM_PROMPT_FILE).write_text(SYSTEM_PROMPT)
            (out / name / ABSTENTIONS_FILE).write_text(json.dumps(ABSTENTIONS, ensure_ascii=False, indent=1))
        write_jsonl(out / "raw" / "qa.jsonl", [q.to_dict() for q in qas])
        if fly.failures:
            flywheel.write_queue(fly, out / "raw" / "flywheel")
        if exchanges:
            write_jsonl(out / "raw" / "exchanges.jsonl", redact_obj(exchanges))  # raw replies may echo a secret
        (out / "report").mkdir()
        (out / "report" / SYNTH_REPORT_FILE).write_text(json.dumps(rep, indent=1, ensure_ascii=False))
        (out / "report" / "synth_report.md").write_text(report_markdown(rep))
        kinds = {
            "cpt": "cpt_dataset", "heldout": "heldout_text", "sft": "sft_dataset", "dpo": "dpo_dataset",
            "golden": "eval_dataset", "unanswerable": "eval_dataset", "raw": "synth_raw", "report": "synth_report",
        }  # fmt: skip
        for name, kind in kinds.items():
            outputs[name] = tracker.log_output(name, out / name, kind=kind)
    return outputs
