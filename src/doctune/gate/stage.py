"""Eval gate: the candidate (merged model and its gated quantized variants), the champion (or the base model when
there is none yet) and the base model, scored on the same sets; config rules decide; the candidate becomes a
registered version aliased `challenger`, tagged with its metrics, lineage and the decision.

`run` reads as its three steps: `score` (every model on every set), `register` (the registry version and its tags),
`write_report` (JSON, Markdown, HTML and charts). Moving `champion` is not done here: the pipeline branches on the
decision (promote / record rejection), and `doctune promote` / `doctune rollback` let a human act.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from doctune.artifacts import ArtifactRef, build_manifest, manifest_digest, refs_from_json
from doctune.cache import Cache
from doctune.chat import ABSTENTIONS
from doctune.code_digest import code_digest
from doctune.config import RunConfig
from doctune.devices import precision
from doctune.gate import registry
from doctune.gate.conformal import AbstentionBound, abstention_bound, threshold_value
from doctune.gate.evaluate import (
    LABELS,
    EvalSets,
    eval_items,
    evaluate_model,
    production_items,
    shipped_general_text,
    shipped_probes,
)
from doctune.gate.judge import JudgeError, judge
from doctune.gate.metrics import group_scores, interval, metric_intervals, paired_difference
from doctune.gate.report import loss_curves, markdown, metric_bars, to_html
from doctune.gate.rules import decide, gated_variants
from doctune.models import resolve_model
from doctune.records import (
    CHUNKS_FILE,
    GATE_REPORT_FILE,
    GOLDEN_FILE,
    HELDOUT_FILE,
    PRODUCTION_FILE,
    QUANTIZE_REPORT_FILE,
    SYSTEM_PROMPT_FILE,
    UNANSWERABLE_FILE,
    read_abstentions,
    read_parquet,
    read_text_file,
    text_records,
    write_jsonl,
)
from doctune.tracking import TAG, StageRun, library_versions
from doctune.train.artifacts import read_meta

REPORT_FILE = GATE_REPORT_FILE


class GateError(RuntimeError):
    """The gate cannot score: no eval items, a gated variant missing from the quantize outputs."""


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """The champion is an input too: a gate result is reused only against the same champion."""
    from doctune.tracking import Tracker

    return {"champion": registry.champion_key(Tracker(config), inputs["model"])}


def build_sets(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> EvalSets:
    g = config.gate
    chunks = read_parquet(tracker.fetch(inputs["chunks"]) / CHUNKS_FILE)
    by_id = {c["chunk_id"]: c for c in chunks}
    golden_dir, unanswerable_dir = tracker.fetch(inputs["golden"]), tracker.fetch(inputs["unanswerable"])
    skipped: list[dict] = []
    golden = eval_items(golden_dir / GOLDEN_FILE, by_id, g.max_golden, skipped)
    unanswerable = eval_items(unanswerable_dir / UNANSWERABLE_FILE, by_id, g.max_unanswerable, skipped)
    if not golden or not unanswerable:
        raise GateError(f"no usable golden ({len(golden)}) or unanswerable ({len(unanswerable)}) items; skipped: {skipped[:5]}")
    production = production_items(golden_dir / PRODUCTION_FILE, g.max_golden, skipped)
    heldout_path = tracker.fetch(inputs["heldout"]) / HELDOUT_FILE
    return EvalSets(
        system_prompt=read_text_file(golden_dir, SYSTEM_PROMPT_FILE) or "",
        abstentions=read_abstentions(unanswerable_dir) or {"en": unanswerable[0]["answer"] or ABSTENTIONS["en"]},
        golden=golden,
        unanswerable=unanswerable,
        production=production,
        probes=shipped_probes(),
        heldout_texts=[r["text"] for r in text_records(heldout_path, skipped)],
        general_texts=shipped_general_text(),
        block_size=g.block_size,
        max_blocks=g.perplexity_blocks,
        closed_book=min(g.max_closed_book, len(golden)),
        abstention_scores=g.hallucination_alpha > 0,
        skipped=skipped,
    )


def retrieval_quality(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict:
    """The retriever stage's comparison (base, tuned, BM25, hybrid) when it ran; otherwise the base embedder against
    BM25, measured the same way: ranx on qrels from the golden questions' source chunks, over the whole corpus."""
    from doctune.config.retriever import RANKING_METRICS
    from doctune.records import RETRIEVER_REPORT_FILE, EvalItem, eval_item, read_records
    from doctune.retrieval import ChunkIndex, compare_retrievers, ranx_runs

    if "retriever" in inputs:
        report = json.loads((tracker.fetch(inputs["retriever"]) / RETRIEVER_REPORT_FILE).read_text())
        return report["comparison"] | {"source": "retriever stage", "selected": report["selected"]}
    chunks = read_parquet(tracker.fetch(inputs["chunks"]) / CHUNKS_FILE)
    ids = [c["chunk_id"] for c in chunks]
    golden: list[EvalItem] = read_records(tracker.fetch(inputs["golden"]) / GOLDEN_FILE, eval_item, [])
    items = [(item.question, set(item.source_ids) & set(ids)) for item in golden]
    items = [(question, sources) for question, sources in items if sources]
    query_ids = [f"q{i}" for i in range(len(items))]
    qrels = {q: dict.fromkeys(sources, 1) for q, (_, sources) in zip(query_ids, items)}
    index = ChunkIndex(
        [c["text"] for c in chunks], config.retrieval.embedding_model, config.project.workdir / "cache", mode="lexical"
    )
    runs = ranx_runs({"base": (index, "dense"), "bm25": (index, "lexical")}, [q for q, _ in items], query_ids, ids)
    return compare_retrievers(qrels, runs, list(RANKING_METRICS)) | {"source": "gate (retriever stage off)", "selected": "base"}


def training_losses(tracker: StageRun, lineage: list[dict]) -> dict[str, list[tuple[int, float]]]:
    histories = {}
    for link in lineage:
        if link.get("stage_run"):
            points = tracker.client.get_metric_history(link["stage_run"], f"{link['stage']}.loss")
            histories[link["stage"]] = sorted((p.step, p.value) for p in points)
    return histories


@dataclass
class Scores:
    """Every model's scores, what the quantized variants are held to, and the champion they were judged against."""

    models: dict[str, dict]  # label -> evaluate_model result ("candidate", "candidate <variant>", "base", "champion")
    variant_ratios: dict[str, float | None]  # gated variant -> perplexity ratio to merged (None: not produced)
    variant_refs: dict[str, ArtifactRef]
    quantized: dict  # the quantize report's variants
    champion: tuple[str, ArtifactRef] | None
    champion_label: str
    precision: str
    base_spec: str
    lineage: list[dict]
    replaced: dict[str, str]  # gated variant standing in for another (gate.variant_fallbacks) -> why


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def scoring_key(config: RunConfig, sets: EvalSets, folder: Path, tokenizer_folder: Path | None, prec: str) -> str:
    """What a model's scores are a function of: its files, the tokenizer it is read with, the sets, the scoring
    settings, the scoring code and the libraries' versions."""
    tokenizer = None
    if tokenizer_folder is not None:
        files = [p for p in Path(tokenizer_folder).iterdir() if p.name in TOKENIZER_FILES]
        tokenizer = manifest_digest(build_manifest(tokenizer_folder, files))
    parts = {
        "model": manifest_digest(build_manifest(folder)),
        "tokenizer": tokenizer,
        "sets": hashlib.sha256(
            json.dumps({k: v for k, v in asdict(sets).items() if k != "skipped"}, sort_keys=True).encode()
        ).hexdigest(),
        "settings": [config.gate.max_new_tokens, config.gate.batch_size, prec],
        "code": code_digest("doctune.gate.evaluate"),
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached_scores(config: RunConfig, sets: EvalSets, folder: Path, tokenizer_folder: Path | None, prec: str) -> dict:
    """evaluate_model's result, from the cache when this model was scored on these sets the same way before (the
    base model and a champion on the next run of the same data); "cached" says which."""
    g = config.gate

    def fresh() -> dict:
        return evaluate_model(folder, sets, g.max_new_tokens, g.batch_size, tokenizer_folder, prec)

    if not g.cache_scores:
        return {**fresh(), "cached": False}
    computed = []
    key = scoring_key(config, sets, folder, tokenizer_folder, prec)
    result = Cache(config.project.workdir / "cache").json("gate_scores", f"{key}.json", lambda: computed.append(1) or fresh())
    return {**result, "cached": not computed}


def score(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun, sets: EvalSets) -> Scores:
    """The candidate, its gated variants, the base model and the champion, each scored on `sets`."""
    g = config.gate
    merged = tracker.fetch(inputs["model"])
    meta = read_meta(merged)
    base_spec = meta.get("base_model", config.model.base_model)
    quantize_outputs = tracker.tracker.outputs_of(tracker.client.get_run(inputs["quantized"].run_id))
    quantized = json.loads((tracker.fetch(inputs["quantized"]) / QUANTIZE_REPORT_FILE).read_text())
    prec = precision(g.precision, "inference")

    def evaluate(folder: Path, tokenizer_folder: Path | None = None) -> dict:
        return cached_scores(config, sets, folder, tokenizer_folder, prec)

    models = {"candidate": evaluate(merged)}
    produced = {v: quantized["variants"][v].get("perplexity_ratio") for v in quantize_outputs if v in quantized["variants"]}
    gated, replaced = gated_variants(g.variants, g.variant_fallbacks, produced, g.rules.max_quantized_ppl_ratio)
    variant_ratios, variant_refs = {}, {}
    for variant in gated:
        if variant not in quantize_outputs:
            variant_ratios[variant] = None  # not produced: the rule fails, naming it
            continue
        variant_refs[variant] = quantize_outputs[variant]
        variant_ratios[variant] = quantized["variants"][variant]["perplexity_ratio"]
        models[f"candidate {variant}"] = evaluate(tracker.fetch(quantize_outputs[variant]), tokenizer_folder=merged)
    current = registry.champion(tracker.tracker)
    models["base"] = evaluate(resolve_model(base_spec, config.project.workdir / "cache"))
    if current is None:
        models["champion"], champion_label = models["base"], "none yet: the base model stands in"
    else:
        models["champion"] = evaluate(tracker.fetch(current[1]))
        champion_label = f"version {current[0]} (model {current[1].digest[7:19]})"
    return Scores(
        models, variant_ratios, variant_refs, quantized["variants"], current, champion_label, prec, base_spec,
        meta.get("lineage", []), replaced,
    )  # fmt: skip


def abstention_bounds(config: RunConfig, models: dict[str, dict], sets: EvalSets) -> dict[str, AbstentionBound]:
    """Per model scored: its abstention threshold for gate.hallucination_alpha at gate.hallucination_confidence,
    tested on the other split."""
    g = config.gate
    if not sets.abstention_scores:
        return {}
    out = {}
    for name, model in models.items():
        pe = model["per_example"]
        out[name] = abstention_bound(
            {"score": pe["golden_abstention_score"], "abstained": pe["golden_abstained"], "f1": pe["golden_f1"]},
            {"score": pe["abstention_score"], "abstained": pe["abstained"]},
            [f"{i['question']}|{n}" for n, i in enumerate(sets.unanswerable)],
            g.hallucination_alpha, 1 - g.hallucination_confidence, g.calibration_fraction, g.seed,
        )  # fmt: skip
    return out


def retrieval_tags(inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """What a server retrieves with for this version: the retriever's index and model and the chunks (none when
    the retriever stage was off)."""
    if "retriever_index" not in inputs or "retriever_model" not in inputs:
        return {}
    refs = {"index": inputs["retriever_index"], "model": inputs["retriever_model"], "chunks": inputs["chunks"]}
    return {registry.RETRIEVAL_TAG: json.dumps({k: ref.to_dict() for k, ref in refs.items()})}


def register(
    inputs: dict[str, ArtifactRef],
    tracker: StageRun,
    scores: Scores,
    outcome: dict,
    bounds: dict[str, AbstentionBound],
    abstentions: dict[str, str],
) -> str:
    """The candidate as a registry version aliased `challenger`, tagged with the decision, metrics and lineage, the
    abstention threshold of each of its models and the abstention sentences they were scored with (what a server
    applies: decline where the mean log-probability of the sentence in the passages' language as the reply reaches
    the threshold)."""
    parent = tracker.client.get_run(tracker.run_id).data.tags.get("mlflow.parentRunId", "")
    datasets = {k: inputs[k].digest for k in ("golden", "unanswerable", "heldout", "chunks")}
    datasets |= {f"{link['stage']}.{k}": v for link in scores.lineage for k, v in link.get("datasets", {}).items()}
    tags = {
        f"{TAG}pipeline_run": parent,
        f"{TAG}gate_run": tracker.run_id,
        f"{TAG}base_model": scores.base_spec,
        registry.GATED_AGAINST_TAG: scores.champion[1].digest if scores.champion else "none",
        f"{TAG}gate_decision": outcome["decision"],
        f"{TAG}failed_rules": ", ".join(outcome["failed"]) or "none",
        f"{TAG}gate_reason": outcome["reason"][:1000],
        f"{TAG}datasets": json.dumps(datasets),
        registry.ABSTENTION_SENTENCES_TAG: json.dumps(abstentions, ensure_ascii=False),
        registry.PASSAGE_LABELS_TAG: "true",
        **retrieval_tags(inputs),
        **{f"gate.{k}": f"{v:.6g}" for k, v in scores.models["candidate"]["metrics"].items()},
        **{
            f"{TAG}abstention_threshold{name.removeprefix('candidate').replace(' ', '.')}": str(threshold_value(bound.threshold))
            for name, bound in bounds.items()
            if name.startswith("candidate")
        },
    }
    return registry.register_candidate(tracker.tracker, inputs["model"], scores.variant_refs, tags)


def write_report(tracker: StageRun, result: dict, lineage: list[dict], records: dict[str, list[dict]]) -> ArtifactRef:
    """The gate report (JSON, Markdown, HTML with charts) as the stage's `report` output, with `records` (file
    name -> rows: the judge's raw verdicts) beside it."""
    with tempfile.TemporaryDirectory(prefix="doctune-gate-") as tmp:
        out = Path(tmp) / "report"
        out.mkdir()
        for name, rows in records.items():
            write_jsonl(out / name, rows)
        charts = []
        if loss_curves(training_losses(tracker, lineage), out / "loss_curves.png"):
            charts.append("loss_curves.png")
        metric_bars(result["models"], out / "metrics.png")
        result["charts"] = [*charts, "metrics.png"]
        text = markdown(result)
        (out / "gate_report.md").write_text(text)
        (out / "gate_report.html").write_text(to_html(text))
        (out / REPORT_FILE).write_text(json.dumps(result, indent=1))
        return tracker.log_output("report", out, kind="gate_report")


def breakdowns(scores: Scores, sets: EvalSets, resamples: int) -> dict[str, dict]:
    """Golden RAG F1 of the candidate and the base per question type, per document and per language."""
    cand, base = (scores.models[m]["per_example"]["golden_f1"] for m in ("candidate", "base"))
    return {
        label: group_scores(cand, base, [item[label] for item in sets.golden], resamples)
        for label in ("qtype", "document", "lang")
    }


def closed_book_vs_rag(models: dict[str, dict], closed_book: int, resamples: int) -> dict[str, dict]:
    """Per model: F1 without context and with the retrieved context on the same first golden items, and the gain the
    context brings (paired). Empty when closed-book questions are switched off."""
    out = {}
    for name, model in models.items():
        closed = model["per_example"].get("closed_book_f1", [])[:closed_book]
        if not closed:
            continue
        rag = model["per_example"]["golden_f1"][: len(closed)]
        out[name] = {"closed_book": interval(closed, resamples), "rag": interval(rag, resamples),
                     "gain": paired_difference(rag, closed, resamples)}  # fmt: skip
    return out


def logged_metrics(result: dict) -> dict[str, float]:
    """What MLflow gets: every metric of every model with its interval bounds and item count, the detectable
    differences, the paired F1 differences, retrieval and the decision (finite values only: MLflow stores floats)."""
    metrics = {}
    for model, row in result["models"].items():
        prefix = f"gate.{model.replace(' ', '_')}"
        metrics |= {f"{prefix}.{k}": v for k, v in row["metrics"].items()}
        for k, ci in row["intervals"].items():
            metrics |= {f"{prefix}.{k}.ci_low": ci["ci_low"], f"{prefix}.{k}.ci_high": ci["ci_high"], f"{prefix}.{k}.n": ci["n"]}
    for key, e in result["evidence"].items():
        metrics |= {f"gate.evidence.{key}.detectable": e["detectable"], f"gate.evidence.{key}.margin": e["margin"]}
    for pair, diff in result["f1_differences"].items():
        name = f"gate.golden_f1_diff.{pair.replace('candidate - ', 'candidate_vs_')}"
        metrics |= {name: diff["mean"], f"{name}.ci_low": diff["ci_low"], f"{name}.ci_high": diff["ci_high"]}
    for model, bound in result.get("abstention_bound", {}).items():
        prefix = f"gate.{model.replace(' ', '_')}.abstention_bound"
        values = {k: bound[k] for k in ("threshold", "hallucination_rate", "answer_rate", "f1_at_threshold")}
        metrics |= {f"{prefix}.{k}": v for k, v in values.items() if isinstance(v, float)}  # "never"/"always"/None: not numbers
    retrieval = result["retrieval"]["metrics"]
    metrics |= {f"gate.retrieval.{r}.{k.replace('@', '_at_')}": v for r, row in retrieval.items() for k, v in row.items()}
    for name, row in ((result.get("judge") or {}).get("sets") or {}).items():
        if row["win_rate"] is not None:
            metrics |= {f"gate.judge.{name}.win_rate": row["win_rate"]["mean"], f"gate.judge.{name}.n": row["n"]}
    metrics |= {"gate.promote": float(result["decision"] == "promote")}
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    g = config.gate
    sets = build_sets(config, inputs, tracker)
    scores = score(config, inputs, tracker, sets)
    bounds = abstention_bounds(config, scores.models, sets)
    resamples = g.rules.bootstrap_resamples
    verdicts = None
    if g.judge.enabled:
        answers = [scores.models[m]["answers"] for m in ("candidate", "champion")]
        try:
            verdicts = judge(g.judge, sets, *answers, scores.champion_label, resamples)
        except JudgeError as exc:
            raise GateError(str(exc)) from None
    outcome = decide(scores.models, scores.variant_ratios, g.rules, bounds, verdicts, scores.replaced)
    retrieval = retrieval_quality(config, inputs, tracker)
    version = register(inputs, tracker, scores, outcome, bounds, sets.abstentions)

    shown = [m for m in scores.models if m != "champion" or scores.champion is not None]
    result = {
        "decision": outcome["decision"],
        "reason": outcome["reason"],
        "failed": outcome["failed"],
        "rules": outcome["rules"],
        "evidence": outcome["evidence"],
        "f1_differences": outcome["f1_differences"],
        "version": version,
        "champion_label": scores.champion_label,
        "precision": scores.precision,
        "models": {
            m: {
                "metrics": scores.models[m]["metrics"],
                "intervals": metric_intervals(scores.models[m]["per_example"], resamples),
                "per_example": scores.models[m]["per_example"],
                "cached": scores.models[m].get("cached", False),
            }
            for m in shown
        },
        "items": {
            "golden": [{k: item[k] for k in LABELS} for item in sets.golden],
            "unanswerable": [{k: item[k] for k in LABELS} for item in sets.unanswerable],
            "production": len(sets.production),
            "closed_book": sets.closed_book,
        },
        "judge": {k: v for k, v in verdicts.items() if k != "verdicts"} if verdicts else None,
        "abstention_bound": {m: bounds[m].as_dict() for m in shown if m in bounds},
        # What citing the first passage every time would score: the floor a citing model's precision means little at.
        "citation_first_passage": sum(1 in item["supporting"] for item in sets.golden) / len(sets.golden),
        "closed_book_vs_rag": closed_book_vs_rag({m: scores.models[m] for m in shown}, sets.closed_book, resamples),
        "breakdowns": breakdowns(scores, sets, resamples),
        "quantized": scores.quantized,
        "retrieval": retrieval,
        "skipped": sets.skipped,
        "samples": [
            {
                "question": item["question"],
                "reference": item["answer"],
                "answers": {m: scores.models[m]["answers"]["golden"][i] for m in shown},
                "closed_book": {m: scores.models[m]["answers"]["closed_book"][i] for m in shown} if i < sets.closed_book else {},
            }
            for i, item in enumerate(sets.golden[: g.samples])
        ],
    }
    tracker.log_metrics(logged_metrics(result))
    tracker.set_tags({f"{TAG}gate.decision": outcome["decision"], f"{TAG}gate.version": version})
    files = {"judge_verdicts.jsonl": verdicts["verdicts"]} if verdicts else {}
    return {"report": write_report(tracker, result, scores.lineage, files)}


def read_decision(refs_json: str, fetch) -> dict:
    """Decision, version and failed rules of a gate result (from its report, so a reused result answers too)."""
    report = json.loads((fetch(refs_from_json(refs_json)["report"]) / REPORT_FILE).read_text())
    return {"decision": report["decision"], "version": report["version"], "failed": report["failed"]}
