"""Submit, schedule and list runs on a Kubeflow Pipelines cluster (kfp.Client, KFP v2beta1 API)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from doctune.cluster import for_cluster
from doctune.config import RunConfig
from doctune_kfp.pipelines.cluster import compile_for_cluster, compile_rerun
from doctune_kfp.pipelines.dags import dag_for

TOKEN_ENV = "DOCTUNE_KFP_TOKEN"  # a bearer token (e.g. `kubectl create token`), for clusters behind auth


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the request; the message says what to check."""


@dataclass(frozen=True)
class Submitted:
    id: str
    url: str


def _host(config: RunConfig, host: str | None) -> str:
    host = (host or config.cluster.host or os.environ.get("KF_PIPELINES_ENDPOINT") or "").rstrip("/")
    if not host:
        raise SubmitError("no KFP endpoint: pass --host URL or set cluster.host in the run config")
    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host {host!r}: expected an http:// or https:// URL of the KFP API")
    return host


def _probe(host: str) -> None:
    """One request to the health endpoint, so that a wrong URL or missing token is said plainly
    (kfp.Client itself retries for half a minute and then dumps a stack of HTTP internals)."""
    request = urllib.request.Request(f"{host}/apis/v2beta1/healthz")
    if token := os.environ.get(TOKEN_ENV):
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            hint = f"the token in {TOKEN_ENV} was refused" if os.environ.get(TOKEN_ENV) else f"set {TOKEN_ENV} to a valid token"
            raise SubmitError(f"KFP at {host} refused the request (HTTP {exc.code}): {hint}") from None
        if exc.code == 404:
            raise SubmitError(f"{host} answers but has no KFP v2 API at /apis/v2beta1 (HTTP 404): check the URL") from None
        raise SubmitError(f"KFP at {host} answered HTTP {exc.code} {exc.reason} on its health check") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(
            f"cannot reach KFP at {host} ({reason}): check the URL, or run "
            "`kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888` and use --host http://127.0.0.1:8888"
        ) from None


def connect(config: RunConfig, host: str | None = None):
    """(kfp.Client, its endpoint URL) after a health check that explains what is wrong."""
    import kfp

    host = _host(config, host)
    _probe(host)
    with contextlib.redirect_stdout(io.StringIO()):
        client = kfp.Client(host=host, namespace=config.cluster.namespace or "kubeflow", existing_token=os.environ.get(TOKEN_ENV))
    return client, host


def _call(what: str, fn, *args, **kwargs):
    """Run one client call; turn the server's refusal into one line naming what failed."""
    from kfp_server_api.exceptions import ApiException

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # kfp prints "Run details: ..." links itself
            return fn(*args, **kwargs)
    except ApiException as exc:
        try:
            detail = json.loads(exc.body or "{}").get("message") or exc.body
        except (TypeError, ValueError):
            detail = exc.body
        raise SubmitError(f"{what} failed: HTTP {exc.status} {exc.reason}: {detail}") from None


def _experiment_id(client, config: RunConfig) -> str:
    cluster = config.cluster
    experiment = _call("creating experiment " + repr(cluster.experiment), client.create_experiment,
                       name=cluster.experiment, namespace=cluster.namespace)  # fmt: skip
    return experiment.experiment_id


def _run_url(host: str, run_id: str) -> str:
    return f"{host}/#/runs/details/{run_id}"


def pipeline_arguments(config: RunConfig) -> dict:
    return {"config": config.to_yaml(), "parent_run_id": "", **dag_for(config).arguments(config)}


def _compiled(config: RunConfig, folder: str) -> Path:
    """The DAG of the config's task, compiled with its cluster settings."""
    return compile_for_cluster(dag_for(config).build_pipeline(config.cluster), Path(folder) / "doctune.yaml", config.cluster)


def submit(config: RunConfig, host: str | None = None, run_name: str | None = None) -> Submitted:
    """Compile the DAG of the config's task with its cluster settings and start one run."""
    config = for_cluster(config)
    client, host = connect(config, host)
    experiment_id = _experiment_id(client, config)
    with tempfile.TemporaryDirectory(prefix="doctune-submit-") as folder:
        run = _call("creating the run", client.run_pipeline, experiment_id=experiment_id,
                    job_name=run_name or f"{config.project.name}", pipeline_package_path=str(_compiled(config, folder)),
                    params=pipeline_arguments(config), service_account=config.cluster.service_account)  # fmt: skip
    return Submitted(run.run_id, _run_url(host, run.run_id))


def kfp_cron(cron: str) -> str:
    """KFP schedules with seconds first (robfig/cron, 6 fields); accept the usual 5-field form too."""
    fields = cron.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise SubmitError(f"--cron {cron!r}: expected 5 fields (minute hour day month weekday), e.g. '0 3 * * 1'")


def schedule(config: RunConfig, cron: str, host: str | None = None, name: str | None = None) -> Submitted:
    """A recurring run of the DAG: one at a time, and no catch-up of runs missed while paused."""
    config = for_cluster(config)
    cron = kfp_cron(cron)
    client, host = connect(config, host)
    experiment_id = _experiment_id(client, config)
    with tempfile.TemporaryDirectory(prefix="doctune-schedule-") as folder:
        job = _call("creating the recurring run", client.create_recurring_run, experiment_id=experiment_id,
                    job_name=name or f"{config.project.name}-retrain", cron_expression=cron, max_concurrency=1,
                    no_catchup=True, params=pipeline_arguments(config),
                    pipeline_package_path=str(_compiled(config, folder)),
                    service_account=config.cluster.service_account)  # fmt: skip
    return Submitted(job.recurring_run_id, f"{host}/#/recurringrun/details/{job.recurring_run_id}")


def submit_rerun(stage: str, from_run: str, config: RunConfig, host: str | None = None) -> Submitted:
    """Rerun one stage on the cluster; its pod resolves the inputs `from_run` recorded in MLflow."""
    config = for_cluster(config)
    client, host = connect(config, host)
    experiment_id = _experiment_id(client, config)
    with tempfile.TemporaryDirectory(prefix="doctune-rerun-") as folder:
        package = compile_rerun(stage, config.cluster, Path(folder) / f"rerun_{stage}.yaml")
        run = _call(f"creating the rerun of {stage}", client.run_pipeline, experiment_id=experiment_id,
                    job_name=f"{config.project.name}-rerun-{stage}", pipeline_package_path=str(package),
                    params={"config": config.to_yaml(), "from_run": from_run},
                    service_account=config.cluster.service_account)  # fmt: skip
    return Submitted(run.run_id, _run_url(host, run.run_id))


def list_runs(config: RunConfig, host: str | None = None, limit: int = 20) -> list[dict]:
    """The experiment's latest runs, newest first."""
    client, host = connect(config, host)
    experiment_id = _experiment_id(client, config)
    response = _call("listing runs", client.list_runs, experiment_id=experiment_id, page_size=limit,
                     sort_by="created_at desc", namespace=config.cluster.namespace)  # fmt: skip
    rows = []
    for run in response.runs or []:
        rows.append({"run_id": run.run_id, "name": run.display_name, "state": run.state, "created": str(run.created_at or ""),
                     "finished": str(run.finished_at or ""), "url": _run_url(host, run.run_id)})  # fmt: skip
    return rows
