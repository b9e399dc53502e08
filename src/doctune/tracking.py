"""MLflow tracking: one parent run per pipeline run, one nested run per stage, artifacts by reference.

Uses MlflowClient throughout (no fluent global state), so stages running in separate
processes or pods nest under the same parent by id.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from contextlib import nullcontext
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from doctune.artifacts import (
    MANIFEST_NAME,
    ArtifactIntegrityError,
    ArtifactRef,
    manifest_digest,
    refs_from_json,
    refs_to_json,
    verify_folder,
    write_manifest,
)
from doctune.cache import Cache, locked
from doctune.config import RunConfig
from doctune.processes import identity, is_alive
from doctune.records import read_jsonl
from doctune.redact import configure as configure_redaction
from doctune.redact import redact

TAG = "doctune."
REACHABLE_TIMEOUT_S = 10.0


class InfrastructureError(RuntimeError):
    """Something doctune needs around it is not usable: the tracking server, the work directory."""


def usable_workdir(workdir: Path) -> None:
    """Create the work directory, or say in one line why it cannot be used."""
    if workdir.exists() and not workdir.is_dir():
        raise InfrastructureError(f"project.workdir {workdir} is a file, not a folder; set project.workdir to a folder")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        blocker = next((p for p in workdir.parents if p.exists() and not p.is_dir()), workdir)
        raise InfrastructureError(f"project.workdir {workdir} cannot be created: {blocker} is a file") from None
    except OSError as exc:
        raise InfrastructureError(f"project.workdir {workdir} cannot be created: {exc.strerror}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-probe-"):
            pass
        database = workdir / "mlflow.db"
        if database.exists():
            with open(database, "r+b"):
                pass
    except OSError as exc:
        raise InfrastructureError(
            f"project.workdir {workdir} is not writable ({exc.strerror}); doctune keeps its tracking store, artifacts "
            "and caches there: set project.workdir to a writable folder"
        ) from None


def check_reachable(uri: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """A tracking server that does not answer fails within `timeout` seconds, naming the URI (MLflow's own client
    retries for minutes in silence)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    # The TLS settings MLflow's own client honours: a private CA, client certificates, or no verification.
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=(timeout / 2, timeout / 2), verify=verify, cert=cert)
    except requests.RequestException as exc:
        cause = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
        if isinstance(exc, requests.exceptions.SSLError):
            cause = "TLS failed: check MLFLOW_TRACKING_SERVER_CERT_PATH / MLFLOW_TRACKING_CLIENT_CERT_PATH"
        raise InfrastructureError(
            f"the tracking server {uri} does not answer ({cause} within {timeout:.0f} s): start it, or set tracking.uri "
            "(--tracking-uri) to one that runs"
        ) from None


PARENT_TAG = "mlflow.parentRunId"
LIBRARIES = (
    "torch", "transformers", "peft", "trl", "datasets", "pymupdf", "kfp", "mlflow", "sentence-transformers",
    "bitsandbytes", "llama_cpp_python",
)  # fmt: skip


@cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("doctune", *LIBRARIES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@cache
def git_commit() -> str:
    """The commit of the doctune source, '+dirty' when it has local changes; DOCTUNE_GIT_COMMIT in images."""
    if env := os.environ.get("DOCTUNE_GIT_COMMIT"):
        return env
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def process_tags() -> dict[str, str]:
    """Which process runs a run: how a later start tells a run left RUNNING by a dead process."""
    return {f"{TAG}process.{key}": value for key, value in identity().items()}


def provenance_tags() -> dict[str, str]:
    tags = {f"{TAG}git_commit": git_commit()}
    tags.update({f"{TAG}version.{name}": version for name, version in library_versions().items()})
    return tags


class Tracker:
    """Where runs and artifacts live for one run config."""

    def __init__(self, config: RunConfig):
        self.config = config
        configure_redaction(config)  # every string this process logs, tags or prints hides the config's secrets
        self.uri = config.tracking_uri
        workdir = config.project.workdir
        usable_workdir(workdir)
        self.cache = Cache(workdir / "cache")
        check_reachable(self.uri)
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):  # "creating tables": not the user's news
            logging.getLogger(name).setLevel(logging.WARNING)
        # A fresh sqlite store creates its tables on first use: two processes doing that at once crash, so the
        # first use of a work directory is serialised.
        with locked(workdir / ".tracking.lock") if self.uri.startswith("sqlite:") else nullcontext():
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(config.experiment_name, workdir / "artifacts")

    def _experiment(self, name: str, local_artifacts: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # A local store keeps artifacts in the project folder, not in ./mlruns of whatever cwd.
        location = local_artifacts.as_uri() if self.uri.startswith("sqlite:") else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)  # created concurrently by another stage
            if found is None:
                raise
            return found.experiment_id

    # -- pipeline runs -------------------------------------------------

    def open_pipeline_run(self, run_name: str | None = None, kfp_run_id: str = "") -> str:
        tags = {
            f"{TAG}kind": "pipeline",
            f"{TAG}config_digest": self.config.digest(),
            **provenance_tags(),
            **process_tags(),
        }
        if kfp_run_id:
            tags[f"{TAG}kfp_run_id"] = kfp_run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        run_id = run.info.run_id
        self.client.log_text(run_id, redact(self.config.to_yaml()), "config/run.yaml")
        return run_id

    def adopt_pipeline_run(self, run_id: str, kfp_run_id: str) -> None:
        """Record the KFP run that executes a parent run the caller created."""
        if kfp_run_id:
            self.client.set_tag(run_id, f"{TAG}kfp_run_id", kfp_run_id)

    def pipeline_run_for_kfp(self, kfp_run_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG}kfp_run_id` = '{kfp_run_id}' and tags.`{TAG}kind` = 'pipeline'"
        )
        return runs[0].info.run_id if runs else None

    def close_pipeline_run(self, run_id: str, succeeded: bool, error: str = "") -> None:
        if error:
            self.client.set_tag(run_id, f"{TAG}error", redact(error)[:4000])
        self.client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")

    def end_run(self, run_id: str, status: str, reason: str) -> None:
        """Close a run as KILLED or FAILED with the reason (redacted like every tag)."""
        StageRun(self, run_id).set_tags({f"{TAG}error": reason[:4000]})
        self.client.set_terminated(run_id, status)

    def close_abandoned_runs(self) -> list[str]:
        """Runs left RUNNING by a process of this host that is gone (killed, crashed) are closed as KILLED, with the
        reason; returns their ids. Runs of live processes, and of other hosts, are left alone."""
        closed = []
        for run in self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'"):
            tags = run.data.tags
            process = [tags.get(f"{TAG}process.{key}", "") for key in ("host", "pid", "started")]
            if all(process) and is_alive(*process) is False:
                reason = f"abandoned: the process that ran it (pid {process[1]}) ended without closing it"
                self.end_run(run.info.run_id, "KILLED", reason)
                closed.append(run.info.run_id)
        return closed

    # -- stage runs ------------------------------------------------------

    def stage_runs(self, parent_run_id: str, stage: str | None = None) -> list[Any]:
        """Finished stage runs under a pipeline run, newest first."""
        query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'"
        if stage:
            query += f" and tags.`{TAG}stage` = '{stage}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])

    def reusable_run(self, stage: str, cache_key: str) -> Any | None:
        """The newest finished run of this stage with the same cache key that made its outputs itself (a reuse hands
        on another run's outputs: if that run is deleted, its reuses are not candidates either)."""
        query = f"tags.`{TAG}stage` = '{stage}' and tags.`{TAG}cache_key` = '{cache_key}' and attributes.status = 'FINISHED'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]):
            if f"{TAG}outputs" in run.data.tags and f"{TAG}reused_from" not in run.data.tags:
                return run
        return None

    def start_stage_run(self, stage: str, parent_run_id: str, tags: dict[str, str]) -> StageRun:
        all_tags = {
            PARENT_TAG: parent_run_id, f"{TAG}kind": "stage", f"{TAG}stage": stage, **provenance_tags(), **process_tags(), **tags
        }  # fmt: skip
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=stage)
        return StageRun(self, run.info.run_id)

    @staticmethod
    def outputs_of(run: Any) -> dict[str, ArtifactRef]:
        return refs_from_json(run.data.tags.get(f"{TAG}outputs", ""))

    # -- artifacts -------------------------------------------------------

    def fetch(self, ref: ArtifactRef) -> Path:
        """A local copy of an artifact folder, verified against the reference's digest on every use.

        A cached copy that no longer matches (edited or corrupted on disk) is discarded and downloaded again; a
        download that does not match raises ArtifactIntegrityError naming the file, and leaves nothing behind.
        """
        what = f"artifact {ref.artifact_path!r} of run {ref.run_id} ({ref.kind})"
        name = ref.digest.replace(":", "-")
        cached = self.cache.entry("artifacts", name)
        if cached.is_dir():
            try:
                verify_folder(cached, ref.digest, what + " [local cache]")
                return cached
            except ArtifactIntegrityError as exc:
                warnings.warn(f"{exc}; discarded, downloading it again", stacklevel=2)
                self.cache.discard("artifacts", name)

        def download(scratch: Path) -> None:
            landing = scratch / ".download"
            landing.mkdir()
            try:
                local = Path(self.client.download_artifacts(ref.run_id, ref.artifact_path, str(landing)))
            except MlflowException as exc:
                raise ArtifactIntegrityError(f"{what}: cannot be downloaded from {self.uri}: {exc}") from exc
            verify_folder(local, ref.digest, what)
            for path in local.iterdir():  # the artifact folder's content becomes the entry
                path.rename(scratch / path.name)
            shutil.rmtree(landing)

        return self.cache.folder("artifacts", name, download)

    def verify_stored(self, ref: ArtifactRef, full: bool = False) -> None:
        """Check the tracking store's copy of an artifact against its reference: the manifest's digest and every
        file's presence and size; with `full`, every file's sha256 too (model weights before they are reused,
        registered or promoted). A mismatch raises ArtifactIntegrityError naming the file."""
        what = f"artifact {ref.artifact_path!r} of run {ref.run_id} ({ref.kind}) in the tracking store"
        with tempfile.TemporaryDirectory(prefix="doctune-verify-") as tmp:
            try:
                if full:
                    verify_folder(Path(self.client.download_artifacts(ref.run_id, ref.artifact_path, tmp)), ref.digest, what)
                    return
                local = self.client.download_artifacts(ref.run_id, f"{ref.artifact_path}/{MANIFEST_NAME}", tmp)
                recorded = json.loads(Path(local).read_text())
            except (MlflowException, OSError, ValueError) as exc:
                raise ArtifactIntegrityError(f"{what}: cannot be read ({str(exc).splitlines()[0][:300]})") from None
        if manifest_digest(recorded) != ref.digest:
            found = manifest_digest(recorded)
            raise ArtifactIntegrityError(f"{what}: its manifest digest {found} is not the reference's {ref.digest}")
        stored = dict(self._stored_files(ref.run_id, ref.artifact_path))
        for entry in recorded["files"]:
            size = stored.pop(entry["path"], None)
            if size is None:
                raise ArtifactIntegrityError(f"{what}: file {entry['path']} is missing")
            if size != entry["size"]:
                raise ArtifactIntegrityError(
                    f"{what}: file {entry['path']} has {size} bytes, its manifest says {entry['size']} (tampered or corrupted)"
                )
        stored.pop(MANIFEST_NAME, None)
        if stored:
            raise ArtifactIntegrityError(f"{what}: file {sorted(stored)[0]} is not in the manifest")

    def _stored_files(self, run_id: str, root: str, path: str | None = None):
        """(path relative to `root`, size) of every file of an artifact folder in the store."""
        for info in self.client.list_artifacts(run_id, path or root):
            if info.is_dir:
                yield from self._stored_files(run_id, root, info.path)
            else:
                yield info.path[len(root) + 1 :], info.file_size or 0  # an empty file's size is left out


class StageRun:
    """The handle a stage function gets: log metrics and outputs into its nested run, fetch inputs."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self.client = tracker.client

    def fetch(self, ref: ArtifactRef) -> Path:
        return self.tracker.fetch(ref)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, redact(str(value))[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, redact(str(value))) for key, value in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_dataset_input(self, ref: ArtifactRef, table: Path, context: str) -> None:
        """Record a consumed dataset as an MLflow dataset input of this run (schema, profile, source ref)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        frame = (
            pd.read_parquet(table)
            if table.suffix == ".parquet"
            else pd.DataFrame([{k: v for k, v in r.items() if k != "_line"} for r in read_jsonl(table, [])])
        )
        source = f"{self.client.get_run(ref.run_id).info.artifact_uri}/{ref.artifact_path}/{table.name}"
        with warnings.catch_warnings():  # source-resolver and integer-schema hints, not problems here
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=f"{ref.kind}:{table.name}", digest=ref.digest[7:23])
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def log_output(self, name: str, folder: Path, kind: str) -> ArtifactRef:
        """Log a folder as the output `name` with its manifest; returns the reference to hand downstream."""
        folder = Path(folder)
        if not folder.is_dir() or not any(folder.iterdir()):
            raise ValueError(f"output {name!r}: {folder} is empty; refusing to log an empty artifact")
        digest = write_manifest(folder)
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=name)
        return ArtifactRef(run_id=self.run_id, artifact_path=name, digest=digest, kind=kind)

    def finish(self, outputs: dict[str, ArtifactRef], extra_tags: dict[str, str] | None = None) -> None:
        tags = {f"{TAG}outputs": refs_to_json(outputs)}
        tags.update({f"{TAG}output.{name}": ref.digest for name, ref in outputs.items()})
        tags.update(extra_tags or {})
        self.set_tags(tags)
        self.client.log_text(self.run_id, json.dumps({k: v.to_dict() for k, v in outputs.items()}, indent=1), "outputs.json")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        self.set_tags({f"{TAG}error": redact(f"{type(error).__name__}: {error}")[:4000]})
        self.client.set_terminated(self.run_id, "FAILED")


__all__ = ["ArtifactIntegrityError", "StageRun", "Tracker", "library_versions", "provenance_tags"]
