"""Eval gate: the candidate (merged model and its gated quantized variants), the champion (or the base model when
there is none yet) and the base model, scored on the same sets; config rules decide; the candidate becomes a
registered version aliased `challenger`, tagged with its metrics, lineage and the decision.

Moving `champion` is not done here: the pipeline branches on the decision (promote / record rejection), and
`doctune promote` / `doctune rollback` let a human act.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.cpt.stage import domain_texts
from doctune.gate import registry
from doctune.gate.evaluate import EvalSets, eval_items, evaluate_model, shipped_general_text, shipped_probes
from doctune.gate.metrics import retrieval_scores
from doctune.gate.report import loss_curves, markdown, metric_bars, to_html
from doctune.gate.rules import decide
from doctune.models import resolve_model
from doctune.runtimes import hardware_bf16
from doctune.synth.prompts import ABSTENTION
from doctune.synth.stage import read_parquet
from doctune.tracking import TAG, StageRun
from doctune.train.artifacts import read_meta

REPORT_FILE = "gate_report.json"


class GateError(RuntimeError):
    """The gate cannot score: no eval items, a gated variant missing from the quantize outputs."""


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """The champion is an input too: a gate result is reused only against the same champion."""
    from doctune.tracking import Tracker

    tracker = Tracker(config)
    current = registry.champion(tracker)
    if current is not None and current[1].digest == inputs["model"].digest:
        # This very model serves already: its gate result stands, keyed as when it was judged (a rerun reuses it).
        return {"champion": registry.gated_against(tracker, current[0])}
    return {"champion": current[1].digest if current else "none"}


def build_sets(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> EvalSets:
    g = config.gate
    chunks = read_parquet(tracker.fetch(inputs["chunks"]) / "chunks.parquet")
    chunk_text = {c["chunk_id"]: c["text"] for c in chunks}
    golden_dir, unanswerable_dir = tracker.fetch(inputs["golden"]), tracker.fetch(inputs["unanswerable"])
    skipped: list[dict] = []
    golden = eval_items(golden_dir / "golden.jsonl", chunk_text, g.max_golden, skipped)
    unanswerable = eval_items(unanswerable_dir / "unanswerable.jsonl", chunk_text, g.max_unanswerable, skipped)
    if not golden or not unanswerable:
        raise GateError(f"no usable golden ({len(golden)}) or unanswerable ({len(unanswerable)}) items; skipped: {skipped[:5]}")
    prompt_file = golden_dir / "system_prompt.txt"
    return EvalSets(
        system_prompt=prompt_file.read_text() if prompt_file.is_file() else "",
        abstention=unanswerable[0]["answer"] or ABSTENTION,
        golden=golden,
        unanswerable=unanswerable,
        probes=shipped_probes(),
        domain_texts=domain_texts(config, tracker.fetch(inputs["cpt"])),
        general_texts=shipped_general_text(),
        block_size=g.block_size,
        max_blocks=g.perplexity_blocks,
        skipped=skipped,
    )


def retrieval_quality(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict:
    """The chunk index the SFT contexts were retrieved with (dense, sentence-transformers) against a TF-IDF
    baseline, on qrels from the golden questions' source chunks."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from doctune.retrieval import ChunkIndex

    chunks = read_parquet(tracker.fetch(inputs["chunks"]) / "chunks.parquet")
    ids = [c["chunk_id"] for c in chunks]
    lines = (tracker.fetch(inputs["golden"]) / "golden.jsonl").read_text().splitlines()
    golden = [json.loads(line) for line in lines if line.strip()]
    qrels = {f"q{i}": {c: 1 for c in item["chunk_ids"]} for i, item in enumerate(golden) if item.get("chunk_ids")}
    questions = [golden[int(q[1:])]["question"] for q in qrels]
    k = min(config.gate.retrieval_k, len(ids))
    index = ChunkIndex([c["text"] for c in chunks], config.retrieval.embedding_model, config.project.workdir / "cache")
    top, scores = index.search(questions, k)
    dense = {q: {ids[j]: float(s) for j, s in zip(top[n], scores[n])} for n, q in enumerate(qrels)}
    tfidf = TfidfVectorizer(sublinear_tf=True).fit([c["text"] for c in chunks])
    similarity = (tfidf.transform(questions) @ tfidf.transform([c["text"] for c in chunks]).T).toarray()
    lexical = {
        q: {ids[j]: float(similarity[n, j]) + 1e-9 for j in similarity[n].argsort()[::-1][:k]} for n, q in enumerate(qrels)
    }
    return retrieval_scores(qrels, {"dense": dense, "tfidf": lexical}, k)


def training_losses(tracker: StageRun, lineage: list[dict]) -> dict[str, list[tuple[int, float]]]:
    histories = {}
    for link in lineage:
        if link.get("stage_run"):
            points = tracker.client.get_metric_history(link["stage_run"], f"{link['stage']}.loss")
            histories[link["stage"]] = sorted((p.step, p.value) for p in points)
    return histories


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    g = config.gate
    sets = build_sets(config, inputs, tracker)
    merged = tracker.fetch(inputs["model"])
    meta = read_meta(merged)
    base_spec = meta.get("base_model", config.model.base_model)
    quantize_run = tracker.client.get_run(inputs["quantized"].run_id)
    quantize_outputs = tracker.tracker.outputs_of(quantize_run)
    quantized = json.loads((tracker.fetch(inputs["quantized"]) / "quantize_report.json").read_text())

    precision = g.precision if g.precision != "auto" else ("bf16" if hardware_bf16() else "fp32")

    def score(folder: Path, tokenizer_folder: Path | None = None) -> dict:
        return evaluate_model(folder, sets, g.max_new_tokens, g.batch_size, tokenizer_folder, precision)

    models = {"candidate": score(merged)}
    variant_ratios, variant_refs = {}, {}
    for variant in g.variants:
        if variant not in quantize_outputs:
            variant_ratios[variant] = None  # not produced: the rule fails, naming it
            continue
        variant_refs[variant] = quantize_outputs[variant]
        variant_ratios[variant] = quantized["variants"][variant]["perplexity_ratio"]
        models[f"candidate {variant}"] = score(tracker.fetch(quantize_outputs[variant]), tokenizer_folder=merged)
    current = registry.champion(tracker.tracker)
    gated_against = current[1].digest if current else "none"
    base_folder = resolve_model(base_spec, config.project.workdir / "cache")
    models["base"] = score(base_folder)
    if current is None:
        models["champion"], champion_label = models["base"], "none yet: the base model stands in"
    else:
        models["champion"] = score(tracker.fetch(current[1]))
        champion_label = f"version {current[0]} (model {current[1].digest[7:19]})"
    outcome = decide(models, variant_ratios, g.rules)
    retrieval = retrieval_quality(config, inputs, tracker)

    parent = tracker.client.get_run(tracker.run_id).data.tags.get("mlflow.parentRunId", "")
    candidate_metrics = models["candidate"]["metrics"]
    version = registry.register_candidate(
        tracker.tracker, inputs["model"], variant_refs,
        {f"{TAG}pipeline_run": parent, f"{TAG}gate_run": tracker.run_id, f"{TAG}base_model": base_spec,
         registry.GATED_AGAINST_TAG: gated_against,
         f"{TAG}gate_decision": outcome["decision"], f"{TAG}failed_rules": ", ".join(outcome["failed"]) or "none",
         f"{TAG}datasets": json.dumps({k: inputs[k].digest for k in ("golden", "unanswerable", "cpt", "chunks")}
                                      | {f"{link['stage']}.{k}": v for link in meta.get("lineage", [])
                                         for k, v in link.get("datasets", {}).items()}),
         **{f"gate.{k}": f"{v:.6g}" for k, v in candidate_metrics.items()}},
    )  # fmt: skip

    shown = [m for m in models if m != "champion" or current is not None]
    result = {
        "decision": outcome["decision"],
        "failed": outcome["failed"],
        "rules": outcome["rules"],
        "version": version,
        "champion_label": champion_label,
        "precision": precision,
        "models": {m: {"metrics": models[m]["metrics"]} for m in shown},
        "quantized": quantized["variants"],
        "retrieval": retrieval,
        "skipped": sets.skipped,
        "samples": [
            {
                "question": item["question"],
                "reference": item["answer"],
                "answers": {m: models[m]["answers"]["golden"][i] for m in shown},
            }
            for i, item in enumerate(sets.golden[: g.samples])
        ],
    }
    with tempfile.TemporaryDirectory(prefix="doctune-gate-") as tmp:
        out = Path(tmp) / "report"
        out.mkdir()
        charts = []
        if loss_curves(training_losses(tracker, meta.get("lineage", [])), out / "loss_curves.png"):
            charts.append("loss_curves.png")
        metric_bars(result["models"], out / "metrics.png")
        charts.append("metrics.png")
        result["charts"] = charts
        text = markdown(result)
        (out / "gate_report.md").write_text(text)
        (out / "gate_report.html").write_text(to_html(text))
        (out / REPORT_FILE).write_text(json.dumps(result, indent=1))
        tracker.log_metrics(
            {f"gate.{m.replace(' ', '_')}.{k}": v for m in shown for k, v in models[m]["metrics"].items()}
            | {
                f"gate.retrieval.{r}.{k.replace('@', '_at_')}": v
                for r, row in retrieval["metrics"].items()
                for k, v in row.items()
            }
            | {"gate.promote": float(outcome["decision"] == "promote")}
        )
        tracker.set_tags({f"{TAG}gate.decision": outcome["decision"], f"{TAG}gate.version": version})
        return {"report": tracker.log_output("report", out, kind="gate_report")}


def read_decision(refs_json: str, fetch) -> dict:
    """Decision, version and failed rules of a gate result (from its report, so a reused result answers too)."""
    from doctune.artifacts import refs_from_json

    report = json.loads((fetch(refs_from_json(refs_json)["report"]) / REPORT_FILE).read_text())
    return {"decision": report["decision"], "version": report["version"], "failed": report["failed"]}


# -- entry points for the thin KFP components ----------------------------------------


def gate_component(config_yaml: str, parent_run_id: str, **upstream: str) -> tuple[str, str, str, str]:
    """Run the gate; returns (refs JSON, decision, version, failed rules JSON) for the pipeline's If/Else."""
    from doctune.config import config_from_yaml
    from doctune.stages import run_stage_component
    from doctune.tracking import Tracker

    refs = run_stage_component("eval_gate", config_yaml, parent_run_id, **upstream)
    decision = read_decision(refs, Tracker(config_from_yaml(config_yaml)).fetch)
    return refs, decision["decision"], decision["version"], json.dumps(decision["failed"])


def promote_component(config_yaml: str, parent_run_id: str, version: str) -> None:
    from doctune.config import config_from_yaml
    from doctune.tracking import Tracker

    tracker = Tracker(config_from_yaml(config_yaml))
    current = registry.champion(tracker)
    if current is None or current[0] != version:  # a rerun of an unchanged pipeline finds it serving already
        registry.promote(tracker, version, reason=f"passed the gate in pipeline run {parent_run_id}")
    tracker.client.set_tag(parent_run_id, f"{TAG}gate.promoted", version)


def reject_component(config_yaml: str, parent_run_id: str, version: str, failed_json: str) -> None:
    from doctune.config import config_from_yaml
    from doctune.tracking import Tracker

    tracker = Tracker(config_from_yaml(config_yaml))
    registry.reject(tracker, version, json.loads(failed_json))
    tracker.client.set_tag(parent_run_id, f"{TAG}gate.rejected", version)
