"""The champion on a cluster: a KServe InferenceService running `doctune serve` or llama.cpp's server (`doctune deploy`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from doctune.config.base import Section
from doctune.config.cluster import Resources

DNS_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"


class DeployConfig(Section):
    """The InferenceService `doctune deploy` creates or patches: the pipeline's deploy step after promote, and
    `doctune promote` / `doctune rollback` when enabled. It serves serve.variant with serve.n_ctx."""

    enabled: bool = Field(
        False,
        description="the pipeline's deploy step and `doctune promote` / `rollback` point the InferenceService at the "
        "champion; off: they leave the cluster alone (`doctune deploy` still deploys when asked)",
    )
    name: str = Field("doctune", pattern=DNS_LABEL, description="InferenceService name")
    namespace: str | None = Field(None, description="null: the namespace of the pod it runs in (set it outside a pod)")
    api_server: str | None = Field(None, description="null: in-cluster config, else ~/.kube/config")
    server: Literal["doctune", "llama-cpp"] = Field(
        "doctune",
        description="the predictor: doctune (`doctune serve --version N` in the pipeline's image: system prompt, "
        "retrieval and citations, the abstention threshold, request and feedback logs on the cache volume where the "
        "next run's synth reads them) or llama-cpp (llama.cpp's llama-server on the GGUF alone: no logs, no "
        "retrieval, no threshold)",
    )
    tracking_uri: str | None = Field(
        None,
        description="server doctune: the MLflow URI the predictor pods fetch the version from; null: tracking.uri "
        "(set it where that is a port-forward, e.g. http://mlflow.kubeflow.svc.cluster.local:5000)",
    )
    image: str = Field(
        "ghcr.io/ggml-org/llama.cpp:server-b8840",
        description="server llama-cpp: llama.cpp's server image (llama-server; a -cuda tag with gpus > 0), pinned by "
        "build number (server doctune runs the pipeline's doctune-cpu or doctune-cuda image, cluster.image_registry)",
    )
    service_account: str = Field(
        "doctune-serving",
        description="the predictor's service account (manifests/base/serving); server llama-cpp: its Secret lets "
        "KServe's storage initializer read the artifact store",
    )
    storage_uri_map: dict[str, str] = Field(
        default_factory=dict,
        description="server llama-cpp: artifact URI prefix -> the URI KServe's storage initializer reads it at, e.g. "
        "{'mlflow-artifacts:/': 's3://<bucket>/mlflow/'} for the MLflow server of manifests/base/mlflow (its "
        "--artifacts-destination)",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="4", memory="16Gi"), description="the predictor's requests and limits"
    )
    gpus: int = Field(0, ge=0, le=16, description="GPUs per replica, placed like cluster.gpu; 0: llama.cpp on CPU")
    replicas: int = Field(
        1, ge=1, le=100,
        description="predictor replicas (no scale to zero: a model loads in minutes); server doctune: 1, its "
        "replicas would share one request log and answer feedback only on their own requests",
    )  # fmt: skip
    ready_timeout_s: float = Field(
        1800.0, ge=0, description="seconds to wait for the new revision to be ready (download and load); 0: do not wait"
    )
    poll_s: float = Field(5.0, gt=0, description="seconds between readiness checks")

    @field_validator("storage_uri_map")
    @classmethod
    def _prefixes(cls, value: dict[str, str]) -> dict[str, str]:
        for source, target in value.items():
            if not source or "://" not in target:
                raise ValueError(f"deploy.storage_uri_map: {source!r} -> {target!r}: map a URI prefix to a URI (s3://...)")
        return value

    @model_validator(mode="after")
    def _one_logging_replica(self) -> DeployConfig:
        if self.server == "doctune" and self.replicas > 1:
            raise ValueError(
                f"deploy.replicas {self.replicas} with deploy.server doctune: replicas would append to one request log "
                "on the shared cache volume, and each answers POST /feedback only for the requests it served itself; "
                "serve one replica, or set deploy.server llama-cpp (no logs)"
            )
        return self
