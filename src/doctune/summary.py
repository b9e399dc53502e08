"""What a finished pipeline run shows on the console: stage table, ingest, synth, training, quantize and gate
summaries, where the artifacts are and what the registry holds. A page-extraction run (`task: page_extraction`) shows
its stage table, training row, page gate decision and report, artifacts and registry."""

from __future__ import annotations

import json
from pathlib import Path

from doctune.gate.page_report import MARKDOWN_FILE
from doctune.records import GATE_REPORT_FILE, INGEST_REPORT_FILE, QUANTIZE_REPORT_FILE, SYNTH_REPORT_FILE
from doctune.tracking import TAG, Tracker

PAGE_GATE_DETAILS = "## Accuracy per key"  # where its summary and rules end


def table(header: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _trained_run(tracker: Tracker, run):
    """The run that did the training: a reused stage run logs no metrics of its own, the run it reused (followed
    through reuse of a reuse) has them. None when that run is gone."""
    seen = {run.info.run_id}
    while reused := run.data.tags.get(f"{TAG}reused_from"):
        if reused in seen:
            return None
        seen.add(reused)
        try:
            run = tracker.client.get_run(reused)
        except Exception:  # MlflowException: deleted, or another tracking store
            return None
    return run


def _training_row(tracker: Tracker, stage: str, run) -> list[object]:
    reused = bool(run.data.tags.get(f"{TAG}reused_from"))
    source = _trained_run(tracker, run)
    label = (f"{stage} (reused)" if source is not None else f"{stage} (reused; its run is gone)") if reused else stage
    if source is None:
        return [label, run.data.params.get(f"{stage}.method", "?"), "", "", "", "", ""]
    m = source.data.metrics
    history = tracker.client.get_metric_history(source.info.run_id, f"{stage}.loss")
    losses = [h.value for h in sorted(history, key=lambda h: h.step)]
    before, after = m.get(f"{stage}.eval_loss_before"), m.get(f"{stage}.eval_loss_after")
    return [
        label,
        run.data.params.get(f"{stage}.method", "?"),
        int(m.get(f"{stage}.global_step", 0)),
        f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "",
        f"{before:.3f} → {after:.3f}"
        if before is not None and after is not None
        else (f"{after:.3f}" if after is not None else ""),
        f"{m.get(f'{stage}.mean_tokens_per_second', 0):.0f}",
        f"{m.get(f'{stage}.padding_fraction', 0):.1%}",
    ]


def _quantize_table(report: dict) -> str:
    rows = [["merged (fp32)", f"{report['merged']['size_bytes'] / 2**20:.1f}", "1.00", f"{report['merged']['tokens_per_s']:.1f}",
             f"{report['merged']['perplexity']:.3f}", "1.000", "baseline"]]  # fmt: skip
    for name, row in report["variants"].items():
        rows.append([name, f"{row['size_bytes'] / 2**20:.1f}", f"{row['size_ratio']:.2f}", f"{row['tokens_per_s']:.1f}",
                     f"{row['perplexity']:.3f}", f"{row['perplexity_ratio']:.3f}", "checked"])  # fmt: skip
    rows += [[name, "", "", "", "", "", f"failed: {error}"] for name, error in report["failed"].items()]
    return table(["variant", "MiB", "size ratio", "tokens/s", "perplexity", "ppl ratio", "status"], rows)


GATE_TABLE = ("golden_f1", "closed_book_f1", "production_f1", "golden_rouge_l", "abstention_accuracy", "false_abstention_rate",
              "hallucination_rate", "capability_accuracy", "format_compliance", "domain_perplexity",
              "general_perplexity")  # fmt: skip


def _gate_cell(model: dict, metric: str) -> str:
    """Mean [95% interval] where the report has one (reports of older versions have none)."""
    value, ci = model["metrics"][metric], model.get("intervals", {}).get(metric)
    return f"{value:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" if ci else f"{value:.3f}"


def _gate_summary(report: dict) -> str:
    models = report["models"]
    shown = [m for m in GATE_TABLE if all(m in models[n]["metrics"] for n in models)]
    rows = []
    for m in shown:
        counts = [models[n].get("intervals", {}).get(m, {}).get("n") for n in models]
        label = "golden_f1 (RAG)" if m == "golden_f1" else m
        rows.append([label, next((c for c in counts if c is not None), ""), *(_gate_cell(models[n], m) for n in models)])
    lines = [
        f"gate: {report['decision'].upper()} candidate version {report['version']} (champion: {report['champion_label']})",
        f"failed rules: {', '.join(report['failed']) or 'none'}",
    ]
    if report["decision"] == "insufficient-evidence":
        lines.append(f"why: {report.get('reason', '')}")
    for key, e in report.get("evidence", {}).items():
        counted = "citations" if key == "citation_precision" else "items"
        verdict = "not checked" if not e.get("checked", True) else "enough" if e["sufficient"] else f"too few {counted}"
        lines.append(
            f"detectable {key} difference: {e['detectable']:.3f} with {e['n']} {counted} (margin {e['margin']:g}, {verdict})"
        )
    for pair, d in report.get("f1_differences", {}).items():
        lines.append(f"golden F1 (RAG) {pair}: {d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    lines.append(table(["metric (mean [95% CI])", "n", *models], rows))
    judged = (report.get("judge") or {}).get("overall")
    if judged and judged["win_rate"] is not None:
        rate = judged["win_rate"]
        lines.append(f"pairwise judge vs {report['judge']['against']}: win rate {rate['mean']:.3f} [{rate['ci_low']:.3f}, "
                     f"{rate['ci_high']:.3f}] over {judged['n']} items ({judged['wins']} won, {judged['losses']} lost, "
                     f"{judged['ties']} tied, {judged['unusable']} unusable)")  # fmt: skip
    return "\n".join(lines)


def _page_gate_summary(folder: Path) -> str:
    """The page gate's decision and its own report: the page track's scores are laid out there, not here."""
    lines = []
    if (folder / GATE_REPORT_FILE).is_file():
        report = json.loads((folder / GATE_REPORT_FILE).read_text())
        lines += [f"page gate: {str(report['decision']).upper()} candidate version {report['version']}",
                  f"failed rules: {', '.join(report['failed']) or 'none'}"]  # fmt: skip
    if (folder / MARKDOWN_FILE).is_file():  # its summary and rules; per-key scores and sample pages stay there
        text = (folder / MARKDOWN_FILE).read_text()
        lines += ["", text.split(PAGE_GATE_DETAILS, 1)[0].strip(), f"(per-key accuracy and sample pages: {MARKDOWN_FILE})"]
    return "\n".join(lines)


def _artifact_lines(tracker: Tracker, finished: dict) -> list[str]:
    """Where the run's main artifacts are (of either track), and what the registry holds now."""
    from doctune.gate import registry

    wanted = [("merge", "model", "merged model"), ("page_merge", "model", "merged model")]
    for stage in ("quantize", "page_quantize"):
        if stage in finished:
            wanted += [(stage, name, name) for name in tracker.outputs_of(finished[stage]) if name != "report"]
    wanted += [("eval_gate", "report", "gate report"), ("page_gate", "report", "gate report")]
    rows = []
    for stage, output, label in wanted:
        if stage in finished and output in (outputs := tracker.outputs_of(finished[stage])):
            ref = outputs[output]
            rows.append([label, f"{tracker.client.get_run(ref.run_id).info.artifact_uri}/{ref.artifact_path}"])
    lines = ["", table(["artifact", "where (MLflow artifact store)"], rows)] if rows else []
    champion = registry.version_by_alias(tracker, registry.CHAMPION)
    challenger = registry.version_by_alias(tracker, registry.CHALLENGER)
    if challenger is not None:
        lines.append(f"registry: model {registry.model_name(tracker)!r}: challenger version {challenger.version}, champion "
                     + (f"version {champion.version}" if champion else "none"))  # fmt: skip
    return lines


def summarize(tracker: Tracker, parent_run_id: str) -> str:
    """Stage table, ingest summary and skipped files of one pipeline run."""
    out = []
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    rows = []
    for run in runs:
        tags = run.data.tags
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0
        reused = tags.get(f"{TAG}reused_from", "")
        rows.append(
            [
                tags.get(f"{TAG}stage", "?"),
                run.info.status,
                f"{seconds:.1f}s",
                f"reused {reused}" if reused else "",
                run.info.run_id,
            ]
        )
    out.append(table(["stage", "status", "time", "note", "mlflow run"], rows))
    for run in runs:
        if error := run.data.tags.get(f"{TAG}error"):
            out.append(f"\n{run.data.tags.get(f'{TAG}stage', '?')} failed: {error}")
    ingest_runs = [r for r in runs if r.data.tags.get(f"{TAG}stage") == "ingest"]
    if ingest_runs and "report" in (outputs := tracker.outputs_of(ingest_runs[-1])):
        report = json.loads((tracker.fetch(outputs["report"]) / INGEST_REPORT_FILE).read_text())
        s = report["summary"]
        out.append("")
        out.append(
            table(
                ["documents", "pages", "flagged pages", "OCR pages", "chunks", "skipped files"],
                [[s["documents"], s["pages"], s["flagged_pages"], s["ocr_pages"], s["chunks"], s["skipped_files"]]],
            )
        )
        skipped = [[f["source"], f["status"], f["reason"]] for f in report["files"] if f["status"] not in ("ok",)]
        if skipped:
            out.append("")
            out.append(table(["file", "status", "reason"], skipped))
    finished = {r.data.tags.get(f"{TAG}stage"): r for r in runs if r.info.status == "FINISHED"}
    if "synth" in finished and "report" in (outputs := tracker.outputs_of(finished["synth"])):
        report = json.loads((tracker.fetch(outputs["report"]) / SYNTH_REPORT_FILE).read_text())
        sizes = report["datasets"]
        synth_row = {
            "QA kept": f"{report['filters']['kept']}/{report['filters']['generated']}",
            "SFT train/val": f"{sizes['sft_train']}/{sizes['sft_validation']}",
            "DPO train/val": f"{sizes['dpo_train']}/{sizes['dpo_validation']}",
            "CPT texts": sizes["cpt"],
            "golden": sizes["golden"],
            "unanswerable": sizes["unanswerable"],
            "abstention": f"{report['abstention_share']:.1%}",
            "contamination": f"{report['contamination_rate']:.1%}",
        }
        out += ["", table(list(synth_row), [list(synth_row.values())])]
    training = [_training_row(tracker, name, finished[name]) for name in ("cpt", "sft", "dpo", "page_sft") if name in finished]
    if training:
        header = ["stage", "method", "steps", "loss first→last", "held-out loss before→after", "tokens/s", "padding"]
        out += ["", table(header, training)]
    if "merge" in finished:
        m = finished["merge"].data.metrics
        if "merge.max_logit_diff" in m:
            out += ["", f"merge check: largest logit gap adapter vs merged {m['merge.max_logit_diff']:.2g} "
                        f"(allowed {m['merge.tolerance']:.2g})"]  # fmt: skip
    if "quantize" in finished and "report" in (outputs := tracker.outputs_of(finished["quantize"])):
        out += ["", _quantize_table(json.loads((tracker.fetch(outputs["report"]) / QUANTIZE_REPORT_FILE).read_text()))]
    if "eval_gate" in finished and "report" in (outputs := tracker.outputs_of(finished["eval_gate"])):
        out += ["", _gate_summary(json.loads((tracker.fetch(outputs["report"]) / GATE_REPORT_FILE).read_text()))]
    if "page_gate" in finished and "report" in (outputs := tracker.outputs_of(finished["page_gate"])):
        out += ["", _page_gate_summary(tracker.fetch(outputs["report"]))]
    out += _artifact_lines(tracker, finished)
    out.append("")
    out.append(f"pipeline run: {parent_run_id}  (tracking: {tracker.uri}, experiment {tracker.config.experiment_name!r})")
    if tracker.uri.startswith("sqlite:"):
        out.append(f"browse it:    mlflow ui --backend-store-uri {tracker.uri}")
    return "\n".join(out)
