"""MLflow tracking: one parent run per pipeline run, one nested run per stage, artifacts by reference.

Uses MlflowClient throughout (no fluent global state), so stages running in separate
processes or pods nest under the same parent by id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from doctune.artifacts import ArtifactIntegrityError, ArtifactRef, refs_from_json, refs_to_json, verify_folder, write_manifest
from doctune.cache import Cache
from doctune.config import RunConfig
from doctune.records import read_jsonl

TAG = "doctune."
PARENT_TAG = "mlflow.parentRunId"
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "pymupdf", "kfp", "mlflow", "sentence-transformers")


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


def provenance_tags() -> dict[str, str]:
    tags = {f"{TAG}git_commit": git_commit()}
    tags.update({f"{TAG}version.{name}": version for name, version in library_versions().items()})
    return tags


class Tracker:
    """Where runs and artifacts live for one run config."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.uri = config.tracking_uri
        workdir = config.project.workdir
        self.cache = Cache(workdir / "cache")
        if self.uri.startswith("sqlite:///"):
            workdir.mkdir(parents=True, exist_ok=True)
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
        }
        if kfp_run_id:
            tags[f"{TAG}kfp_run_id"] = kfp_run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        run_id = run.info.run_id
        self.client.log_text(run_id, self.config.to_yaml(), "config/run.yaml")
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
            self.client.set_tag(run_id, f"{TAG}error", error[:4000])
        self.client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")

    # -- stage runs ------------------------------------------------------

    def stage_runs(self, parent_run_id: str, stage: str | None = None) -> list[Any]:
        """Finished stage runs under a pipeline run, newest first."""
        query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'"
        if stage:
            query += f" and tags.`{TAG}stage` = '{stage}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])

    def reusable_run(self, stage: str, cache_key: str) -> Any | None:
        """The newest finished run of this stage with the same cache key (its outputs are content-addressed)."""
        query = f"tags.`{TAG}stage` = '{stage}' and tags.`{TAG}cache_key` = '{cache_key}' and attributes.status = 'FINISHED'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]):
            if f"{TAG}outputs" in run.data.tags:
                return run
        return None

    def start_stage_run(self, stage: str, parent_run_id: str, tags: dict[str, str]) -> StageRun:
        all_tags = {PARENT_TAG: parent_run_id, f"{TAG}kind": "stage", f"{TAG}stage": stage, **provenance_tags(), **tags}
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


class StageRun:
    """The handle a stage function gets: log metrics and outputs into its nested run, fetch inputs."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self.client = tracker.client

    def fetch(self, ref: ArtifactRef) -> Path:
        return self.tracker.fetch(ref)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

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
        self.set_tags({f"{TAG}error": f"{type(error).__name__}: {error}"[:4000]})
        self.client.set_terminated(self.run_id, "FAILED")


__all__ = ["ArtifactIntegrityError", "StageRun", "Tracker", "library_versions", "provenance_tags"]
