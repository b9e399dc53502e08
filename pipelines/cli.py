"""`doctune` command line: run the pipeline locally, compile, submit and schedule it, run or rerun one stage, move
the registry's aliases, prune the cache. It lives beside the pipelines because it drives kfp; the logic it calls
is in `doctune`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

from doctune.artifacts import ArtifactIntegrityError
from doctune.cluster.kube import KubernetesError
from doctune.config import ConfigError, RunConfig, load_config
from doctune.config.pages import Task
from doctune.deploy import DeployError, deploy
from doctune.gate.registry import RegistryError
from doctune.models import ModelResolutionError
from doctune.processes import Interrupted, stop_on_signals, stopped_by
from doctune.redact import redact
from doctune.stages import STAGES, StageError, execute_stage, resolve_from_run
from doctune.summary import summarize, table
from doctune.tracking import InfrastructureError, Tracker

USER_ERRORS = (
    ConfigError, StageError, ModelResolutionError, ArtifactIntegrityError, FileNotFoundError, RegistryError, InfrastructureError,
    DeployError, KubernetesError,
)  # fmt: skip


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


def cmd_run(args: argparse.Namespace) -> int:
    from doctune_kfp.pipelines.local import LocalRunError, run_local

    config = _load(args)
    tracker = Tracker(config)
    log = None
    if not args.verbose:
        log = config.project.workdir / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        parent = run_local(config, log_path=log)
    except LocalRunError as exc:
        print(summarize(tracker, exc.parent_run_id), file=sys.stderr)
        print(redact(f"error: the pipeline failed: {exc}") + (f" (component logs: {log})" if log else ""), file=sys.stderr)
        return 1
    print(summarize(tracker, parent) + (f"\ncomponent logs: {log}" if log else ""))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from doctune_kfp.pipelines.dags import DAGS

    if args.output and not args.task:
        raise ConfigError(f"--output names one file: pass --task too ({', '.join(DAGS)})")
    for task in [args.task] if args.task else DAGS:
        print(f"wrote {DAGS[task].compile_pipeline(args.output or DAGS[task].IR_YAML)}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.submit:
        from doctune_kfp.pipelines.submit import submit_rerun

        if not args.from_run:
            raise ConfigError("--submit reruns a stage of an earlier run: pass --from-run RUN_ID too")
        done = submit_rerun(args.name, args.from_run, config, host=args.host)
        print(f"submitted rerun of {args.name} (inputs from {args.from_run}): KFP run {done.id}\n{done.url}")
        return 0
    tracker = Tracker(config)
    tracker.close_abandoned_runs()
    if args.from_run:
        parent, inputs, replaced = resolve_from_run(args.name, tracker, args.from_run)
        with stop_on_signals(end_children_first=True):
            result = execute_stage(args.name, config, tracker, parent, inputs, replaces=replaced)
        if replaced:
            print(f"{args.name}: new run {result.run_id} replaces {replaced} in pipeline run {parent}")
    else:
        parent = tracker.open_pipeline_run(run_name=f"stage-{args.name}")
        try:
            with stop_on_signals(end_children_first=True):
                execute_stage(args.name, config, tracker, parent, {})
        except BaseException as exc:
            if stopped_by(exc):
                tracker.end_run(parent, "KILLED", f"{getattr(exc, 'signal_name', 'SIGINT')}: the run was interrupted")
                exc.parent_run_id = parent
            else:
                tracker.close_pipeline_run(parent, succeeded=False, error=f"{type(exc).__name__}: {exc}")
            raise
        tracker.close_pipeline_run(parent, succeeded=True)
    print(summarize(tracker, parent))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from doctune.gate import registry

    config = _load(args)
    tracker = Tracker(config)
    previous = registry.promote(tracker, args.version, reason=args.reason)
    print(f"{registry.model_name(tracker)}: champion -> version {args.version}"
          + (f" (previous-champion: version {previous})" if previous else ""))  # fmt: skip
    _cluster_follows(config, tracker)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from doctune.gate import registry

    config = _load(args)
    tracker = Tracker(config)
    demoted, restored = registry.rollback(tracker, reason=args.reason)
    print(f"{registry.model_name(tracker)}: champion -> version {restored} (version {demoted} rolled back)")
    _cluster_follows(config, tracker)
    return 0


def _cluster_follows(config: RunConfig, tracker: Tracker) -> None:
    """With deploy.enabled, the cluster's InferenceService serves the champion the registry now names."""
    if config.deploy.enabled:
        deploy(config, tracker=tracker)


def cmd_deploy(args: argparse.Namespace) -> int:
    deploy(_load(args), version=args.version)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from doctune.serve import ServeError, Server

    overrides = [
        f"serve.{key}={value}"
        for key in ("alias", "version", "variant", "host", "port")
        if (value := getattr(args, key)) is not None
    ]
    args.overrides = [*args.overrides, *overrides]
    try:
        server = Server(_load(args))
    except ServeError as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 2
    server.start()
    deployment = server.backend.deployment
    pinned, alias = server.serve.version, server.serve.alias
    what = f"version {deployment.version} (pinned" if pinned else f"{alias} (version {deployment.version}"
    print(f"serving {what}, {deployment.variant}) at {server.url}/v1; "
          f"requests and feedback logged to {server.log_dir}; Ctrl-C stops", flush=True)  # fmt: skip
    try:
        with stop_on_signals():
            while True:
                time.sleep(3600)
    finally:
        server.close()


def cmd_submit(args: argparse.Namespace) -> int:
    from doctune_kfp.pipelines.submit import submit

    done = submit(_load(args), host=args.host, run_name=args.name)
    print(f"submitted KFP run {done.id}\n{done.url}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from doctune_kfp.pipelines.submit import schedule

    done = schedule(_load(args), args.cron, host=args.host, name=args.name)
    print(f"created recurring run {done.id} ({args.cron}; one at a time, no catch-up)\n{done.url}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from doctune_kfp.pipelines.submit import list_runs

    runs = list_runs(_load(args), host=args.host, limit=args.limit)
    print(table(["run", "name", "state", "created", "finished"],
                 [[r["run_id"], r["name"], r["state"], r["created"], r["finished"]] for r in runs]))  # fmt: skip
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from doctune.cache import exclusive, prune
    from doctune.stages import cache_entries_in_use

    config = _load(args)
    tracker = Tracker(config)
    with exclusive(tracker.cache.root):
        removed, freed = prune(tracker.cache, cache_entries_in_use(tracker), args.dry_run, args.include_resume_state)
    verb = "would remove" if args.dry_run else "removed"
    for entry, size in removed:
        print(f"{verb} {entry} ({size / 2**20:.1f} MiB)")
    print(f"{verb} {len(removed)} cache entries no run references: {freed / 2**20:.1f} MiB freed")
    return 0


def cmd_flywheel(args: argparse.Namespace) -> int:
    from doctune import flywheel

    config = _load(args)
    fly = flywheel.collect(config)
    folder = flywheel.log_dir(config)
    if not fly.interactions:
        print(f"no answered requests logged in {folder}: nothing to mine")
        return 0
    queue = flywheel.write_queue(fly, folder / "labeling")
    counts = fly.counts
    mined = ", ".join(f"{r} {counts[f'mined_{r}']}" for r in flywheel.REASONS if counts[f"mined_{r}"]) or "none"
    print(f"{fly.interactions} answered requests ({' to '.join(fly.window or ())}); failures {counts['failures']} "
          f"({mined}); rated up {counts['positives']}; labeled {counts['labeled_failures']}")  # fmt: skip
    print(f"{counts['queued']} failures wait for a label: {queue} (import into Label Studio with "
          f"{queue.parent / flywheel.LABEL_CONFIG_FILE}); put labels in {flywheel.labels_dir(config)}")  # fmt: skip
    for line in fly.skipped:
        print(redact(f"skipped: {line['file']}" + (f" line {line['line']}" if line.get("line") else "") + f": {line['reason']}"))
    return 0


def _host_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="KFP API endpoint (default: cluster.host, then $KF_PIPELINES_ENDPOINT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doctune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline of the config's task locally (kfp.local)")
    _config_args(run)
    run.add_argument("--verbose", action="store_true", help="show kfp.local's and the components' output here, not in a log")
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser("compile", help="write the pipelines' KFP IR YAML (one per task)")
    comp.add_argument("--task", choices=sorted(get_args(Task)), help="only this task's DAG (default: every task's)")
    comp.add_argument("--output", type=Path, help="with --task: where to write it (default: its pipelines/*_pipeline.yaml)")
    comp.set_defaults(func=cmd_compile)
    stage = sub.add_parser("stage", help="run one stage directly, or rerun it against an earlier run's artifacts")
    stage.add_argument("name", choices=sorted(STAGES))
    _config_args(stage)
    stage.add_argument("--from-run", help="pipeline (or stage) run id whose recorded outputs feed this stage")
    stage.add_argument("--submit", action="store_true", help="rerun it on the cluster (a one-component KFP run)")
    _host_arg(stage)
    stage.set_defaults(func=cmd_stage)
    sub_run = sub.add_parser("submit", help="compile the config's task's pipeline with the cluster settings and start a KFP run")
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
    dep = sub.add_parser("deploy", help="point the cluster's KServe InferenceService at the champion (or --version)")
    dep.add_argument("--version", help="a registered version to serve instead of the champion")
    _config_args(dep)
    dep.set_defaults(func=cmd_deploy)
    serve = sub.add_parser("serve", help="serve the champion (or another alias) through llama.cpp, logging requests")
    serve.add_argument("--alias", help="registry alias to serve and follow (default: serve.alias, champion)")
    serve.add_argument("--version", help="serve this registered version; the alias is not followed (default: serve.version)")
    serve.add_argument("--variant", help="GGUF variant to serve (default: serve.variant, gated: the one the gate ruled on)")
    serve.add_argument("--host", help="listen address (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: serve.port, 8000)")
    _config_args(serve)
    serve.set_defaults(func=cmd_serve)
    fly = sub.add_parser(
        "flywheel", help="mine the serving logs now: failures, what is labeled, and the labeling queue (Label Studio)"
    )
    _config_args(fly)
    fly.set_defaults(func=cmd_flywheel)
    cache = sub.add_parser("cache", help="the work directory's cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    prune = cache_sub.add_parser("prune", help="remove cache entries no run in the tracking store references")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    prune.add_argument(
        "--include-resume-state", action="store_true",
        help="also remove what an unfinished stage would resume from (teacher output so far, training checkpoints)",
    )  # fmt: skip
    _config_args(prune)
    prune.set_defaults(func=cmd_cache_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (Interrupted, KeyboardInterrupt) as exc:
        where = f"pipeline run {exc.parent_run_id} closed as KILLED; " if hasattr(exc, "parent_run_id") else ""
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"interrupted ({name}): {where}run the same command again to resume (finished stages are reused)", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except USER_ERRORS as exc:
        print(redact(f"error: {exc}"), file=sys.stderr)
        return 2
    except RuntimeError as exc:  # stage errors such as IngestError: say what, not a traceback
        print(redact(f"error: {type(exc).__name__}: {exc}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
