"""Running on a Kubeflow cluster: what a run config must say there, and multi-node training jobs."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from doctune.config import ConfigError, RunConfig

LOCAL_TRACKING = ("sqlite:", "file:")


def for_cluster(config: RunConfig) -> RunConfig:
    """The config as pods must see it: tracking on a server, local state on the cache volume.

    Raises ConfigError naming the key when the config can only work on this machine.
    """
    if config.tracking_uri.startswith(LOCAL_TRACKING) or "://" not in config.tracking_uri:
        raise ConfigError(
            f"tracking.uri is {config.tracking_uri!r}, a store on this machine that cluster pods cannot reach: "
            "set it to the MLflow server (manifests/base/mlflow, e.g. http://mlflow.kubeflow.svc.cluster.local:5000)"
        )
    mount = PurePosixPath(config.cluster.cache_volume.mount_path)
    pdfs = PurePosixPath(config.ingest.pdfs.as_posix())
    if mount not in pdfs.parents and pdfs != mount:
        raise ConfigError(
            f"ingest.pdfs is {str(pdfs)!r}, not on the cache volume that pods mount at {mount}: copy the PDFs there "
            f"(README, operator section) and set ingest.pdfs to that path"
        )
    workdir = Path(str(mount / "workdir" / config.project.name))
    return config.model_copy(update={"project": config.project.model_copy(update={"workdir": workdir})})
