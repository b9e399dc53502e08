"""`doctune` command line: run the pipeline locally, compile it, run or rerun one stage."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from doctune.artifacts import ArtifactIntegrityError
from doctune.config import ConfigError, RunConfig, load_config
from doctune.gate.registry import RegistryError
from doctune.models import ModelResolutionError
from doctune.stages import STAGES, StageError, execute_stage, resolve_from_run
from doctune.tracking import TAG, Tracker

USER_ERRORS = (ConfigError, StageError, ModelResolutionError, ArtifactIntegrityError, FileNotFoundError, RegistryError)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="run YAML (default: built-in defaults, as in configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store under project.workdir)")
    parser.add_argument("--pdfs", type=Path, help="folder of PDFs to ingest (same as --set ingest.pdfs=...)")


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.pdfs:
        overrides.append(f"ingest.pdfs={args.pdfs}")
    return load_config(args.config, overrides)


def _table(header: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _training_row(tracker: Tracker, stage: str, run) -> list[object]:
    m = run.data.metrics
    history = tracker.client.get_metric_history(run.info.run_id, f"{stage}.loss")
    losses = [h.value for h in sorted(history, key=lambda h: h.step)]
    before, after = m.get(f"{stage}.eval_loss_before"), m.get(f"{stage}.eval_loss_after")
    return [
        stage,
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
    return _table(["variant", "MiB", "size ratio", "tokens/s", "perplexity", "ppl ratio", "status"], rows)


GATE_TABLE = ("golden_f1", "golden_rouge_l", "abstention_accuracy", "hallucination_rate", "capability_accuracy",
              "format_compliance", "domain_perplexity", "general_perplexity")  # fmt: skip


def _gate_summary(report: dict) -> str:
    models = report["models"]
    rows = [[m, *(f"{models[n]['metrics'][m]:.3f}" for n in models)] for m in GATE_TABLE]
    lines = [
        f"gate: {report['decision'].upper()} candidate version {report['version']} (champion: {report['champion_label']})",
        f"failed rules: {', '.join(report['failed']) or 'none'}",
        _table(["metric", *models], rows),
    ]
    return "\n".join(lines)


def _artifact_lines(tracker: Tracker, finished: dict) -> list[str]:
    """Where the run's main artifacts are, and what the registry holds now."""
    from doctune.gate import registry

    wanted = [("merge", "model", "merged model"), ("eval_gate", "report", "gate report")]
    if "quantize" in finished:
        wanted[1:1] = [("quantize", name, name) for name in tracker.outputs_of(finished["quantize"]) if name != "report"]
    rows = []
    for stage, output, label in wanted:
        if stage in finished and output in (outputs := tracker.outputs_of(finished[stage])):
            ref = outputs[output]
            rows.append([label, f"{tracker.client.get_run(ref.run_id).info.artifact_uri}/{ref.artifact_path}"])
    lines = ["", _table(["artifact", "where (MLflow artifact store)"], rows)] if rows else []
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
    out.append(_table(["stage", "status", "time", "note", "mlflow run"], rows))
    for run in runs:
        if error := run.data.tags.get(f"{TAG}error"):
            out.append(f"\n{run.data.tags.get(f'{TAG}stage', '?')} failed: {error}")
    ingest_runs = [r for r in runs if r.data.tags.get(f"{TAG}stage") == "ingest"]
    if ingest_runs and "report" in (outputs := tracker.outputs_of(ingest_runs[-1])):
        report = json.loads((tracker.fetch(outputs["report"]) / "ingest_report.json").read_text())
        s = report["summary"]
        out.append("")
        out.append(
            _table(
                ["documents", "pages", "flagged pages", "OCR pages", "chunks", "skipped files"],
                [[s["documents"], s["pages"], s["flagged_pages"], s["ocr_pages"], s["chunks"], s["skipped_files"]]],
            )
        )
        skipped = [[f["source"], f["status"], f["reason"]] for f in report["files"] if f["status"] not in ("ok",)]
        if skipped:
            out.append("")
            out.append(_table(["file", "status", "reason"], skipped))
    finished = {r.data.tags.get(f"{TAG}stage"): r for r in runs if r.info.status == "FINISHED"}
    if "synth" in finished and "report" in (outputs := tracker.outputs_of(finished["synth"])):
        report = json.loads((tracker.fetch(outputs["report"]) / "synth_report.json").read_text())
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
        out += ["", _table(list(synth_row), [list(synth_row.values())])]
    training = [_training_row(tracker, name, finished[name]) for name in ("cpt", "sft", "dpo") if name in finished]
    if training:
        header = ["stage", "method", "steps", "loss first→last", "held-out loss before→after", "tokens/s", "padding"]
        out += ["", _table(header, training)]
    if "merge" in finished:
        m = finished["merge"].data.metrics
        if "merge.max_logit_diff" in m:
            out += ["", f"merge check: largest logit gap adapter vs merged {m['merge.max_logit_diff']:.2g} "
                        f"(allowed {m['merge.tolerance']:.2g})"]  # fmt: skip
    if "quantize" in finished and "report" in (outputs := tracker.outputs_of(finished["quantize"])):
        out += ["", _quantize_table(json.loads((tracker.fetch(outputs["report"]) / "quantize_report.json").read_text()))]
    if "eval_gate" in finished and "report" in (outputs := tracker.outputs_of(finished["eval_gate"])):
        out += ["", _gate_summary(json.loads((tracker.fetch(outputs["report"]) / "gate_report.json").read_text()))]
    out += _artifact_lines(tracker, finished)
    out.append("")
    out.append(f"pipeline run: {parent_run_id}  (tracking: {tracker.uri}, experiment {tracker.config.experiment_name!r})")
    if tracker.uri.startswith("sqlite:"):
        out.append(f"browse it:    mlflow ui --backend-store-uri {tracker.uri}")
    return "\n".join(out)


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.local import LocalRunError, run_local

    config = _load(args)
    tracker = Tracker(config)
    log = None
    if not args.verbose:
        log = config.project.workdir / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        parent = run_local(config, log_path=log)
    except LocalRunError as exc:
        print(summarize(tracker, exc.parent_run_id), file=sys.stderr)
        print(f"error: the pipeline failed: {exc}" + (f" (component logs: {log})" if log else ""), file=sys.stderr)
        return 1
    print(summarize(tracker, parent) + (f"\ncomponent logs: {log}" if log else ""))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.doctune_pipeline import IR_YAML, compile_pipeline

    path = compile_pipeline(args.output or IR_YAML)
    print(f"wrote {path}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.submit:
        from pipelines.submit import submit_rerun

        if not args.from_run:
            raise ConfigError("--submit reruns a stage of an earlier run: pass --from-run RUN_ID too")
        done = submit_rerun(args.name, args.from_run, config, host=args.host)
        print(f"submitted rerun of {args.name} (inputs from {args.from_run}): KFP run {done.id}\n{done.url}")
        return 0
    tracker = Tracker(config)
    if args.from_run:
        parent, inputs, replaced = resolve_from_run(args.name, tracker, args.from_run)
        result = execute_stage(args.name, config, tracker, parent, inputs, replaces=replaced)
        if replaced:
            print(f"{args.name}: new run {result.run_id} replaces {replaced} in pipeline run {parent}")
    else:
        parent = tracker.open_pipeline_run(run_name=f"stage-{args.name}")
        try:
            execute_stage(args.name, config, tracker, parent, {})
        except BaseException as exc:
            tracker.close_pipeline_run(parent, succeeded=False, error=f"{type(exc).__name__}: {exc}")
            raise
        tracker.close_pipeline_run(parent, succeeded=True)
    print(summarize(tracker, parent))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from doctune.gate import registry

    tracker = Tracker(_load(args))
    previous = registry.promote(tracker, args.version, reason=args.reason)
    print(f"{registry.model_name(tracker)}: champion -> version {args.version}"
          + (f" (previous-champion: version {previous})" if previous else ""))  # fmt: skip
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from doctune.gate import registry

    tracker = Tracker(_load(args))
    demoted, restored = registry.rollback(tracker, reason=args.reason)
    print(f"{registry.model_name(tracker)}: champion -> version {restored} (version {demoted} rolled back)")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import submit

    done = submit(_load(args), host=args.host, run_name=args.name)
    print(f"submitted KFP run {done.id}\n{done.url}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.submit import schedule

    done = schedule(_load(args), args.cron, host=args.host, name=args.name)
    print(f"created recurring run {done.id} ({args.cron}; one at a time, no catch-up)\n{done.url}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipelines.submit import list_runs

    runs = list_runs(_load(args), host=args.host, limit=args.limit)
    print(_table(["run", "name", "state", "created", "finished"],
                 [[r["run_id"], r["name"], r["state"], r["created"], r["finished"]] for r in runs]))  # fmt: skip
    return 0


def _host_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="KFP API endpoint (default: cluster.host, then $KF_PIPELINES_ENDPOINT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doctune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline locally (kfp.local)")
    _config_args(run)
    run.add_argument("--verbose", action="store_true", help="show kfp.local's and the components' output here, not in a log")
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser("compile", help="write the pipeline's KFP IR YAML")
    comp.add_argument("--output", type=Path, help="default: pipelines/doctune_pipeline.yaml")
    comp.set_defaults(func=cmd_compile)
    stage = sub.add_parser("stage", help="run one stage directly, or rerun it against an earlier run's artifacts")
    stage.add_argument("name", choices=sorted(STAGES))
    _config_args(stage)
    stage.add_argument("--from-run", help="pipeline (or stage) run id whose recorded outputs feed this stage")
    stage.add_argument("--submit", action="store_true", help="rerun it on the cluster (a one-component KFP run)")
    _host_arg(stage)
    stage.set_defaults(func=cmd_stage)
    sub_run = sub.add_parser("submit", help="compile the pipeline with the cluster settings and start a KFP run")
    _config_args(sub_run)
    _host_arg(sub_run)
    sub_run.add_argument("--name", help="run name (default: project.name)")
    sub_run.set_defaults(func=cmd_submit)
    sched = sub.add_parser("schedule", help="create the recurring (e.g. weekly) retrain on the cluster")
    _config_args(sched)
    _host_arg(sched)
    sched.add_argument("--cron", default="0 3 * * 1", help="5-field cron, cluster time zone (default: Mondays 03:00)")
    sched.add_argument("--name", help="recurring run name (default: <project>-retrain)")
    sched.set_defaults(func=cmd_schedule)
    runs = sub.add_parser("runs", help="list the cluster's runs of this project's experiment")
    _config_args(runs)
    _host_arg(runs)
    runs.add_argument("--limit", type=int, default=20)
    runs.set_defaults(func=cmd_runs)
    prom = sub.add_parser("promote", help="make a registered version the champion (recorded with who and why)")
    prom.add_argument("version")
    prom.add_argument("--reason", default="promoted by hand")
    _config_args(prom)
    prom.set_defaults(func=cmd_promote)
    back = sub.add_parser("rollback", help="make the previous champion the champion again (recorded)")
    back.add_argument("--reason", default="rolled back by hand")
    _config_args(back)
    back.set_defaults(func=cmd_rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # stage errors such as IngestError: say what, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
