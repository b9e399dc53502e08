"""How the compiled pipeline runs on a Kubeflow cluster (kfp-kubernetes); local runs ignore it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from doctune.config.base import Section

CPU = r"^[0-9]+(\.[0-9]+)?m?$"
MEMORY = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$"


class Resources(Section):
    """Kubernetes requests and limits of one component's pod (limits default to the requests)."""

    cpu: str = Field("2", pattern=CPU, description="CPU request, e.g. 4 or 500m")
    memory: str = Field("8Gi", pattern=MEMORY, description="memory request, e.g. 16Gi")
    cpu_limit: str | None = Field(None, pattern=CPU, description="null: the request")
    memory_limit: str | None = Field(None, pattern=MEMORY, description="null: the request")


class Toleration(Section):
    """A Kubernetes toleration of a node taint."""

    key: str = Field(description="taint key")
    operator: Literal["Exists", "Equal"] = Field("Exists", description="Exists or Equal (then value counts)")
    value: str | None = Field(None, description="taint value (operator Equal)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        "NoSchedule", description="taint effect tolerated; null: all"
    )


# Training, merge, quantize (and the page gate, which runs three vision-language models) need a GPU on a cluster.
GPU_STAGES = ("cpt", "sft", "dpo", "merge", "quantize", "page_sft", "page_merge", "page_quantize", "page_gate")


class GpuPlacement(Section):
    """Where GPU components run: accelerator, count, and the GPU node pool's label and taint."""

    stages: list[str] = Field(
        default_factory=lambda: list(GPU_STAGES),
        description="components placed on the GPU pool",
    )
    accelerator_type: str = Field("nvidia.com/gpu", description="resource name; set_accelerator_type")
    count: int = Field(1, ge=1, le=16, description="GPUs per pod (and processes per node of a multi-node job)")
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"doctune.io/pool": "gpu"}, description="node labels of the GPU pool"
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu")], description="taints of the GPU pool tolerated"
    )


class CacheVolume(Section):
    """Model and dataset caches (and the stages' workdir) of every pod."""

    kind: Literal["pvc", "ephemeral"] = Field("pvc", description="pvc: shared and kept (manifests/); ephemeral: per pod")
    name: str = Field("doctune-model-cache", description="PVC name (kind pvc)")
    mount_path: str = Field("/var/cache/doctune", description="where every pod mounts it")
    size: str = Field("100Gi", description="kind ephemeral: requested size")
    storage_class: str | None = Field(None, description="kind ephemeral: storage class; null: the cluster default")


class SecretEnv(Section):
    """Keys of one Kubernetes Secret exposed to every pod as environment variables."""

    secret: str = Field(description="Secret name")
    env: dict[str, str] = Field(description="secret key -> environment variable")
    optional: bool = Field(False, description="pods start without it (e.g. no teacher API, no MLflow auth)")


class TrainingJobSettings(Section):
    """A training stage with nodes > 1 creates this Kubeflow job through the Kubernetes API and waits for it."""

    kind: Literal["PyTorchJob", "TrainJob"] = Field("PyTorchJob", description="TrainJob: Kubeflow Trainer v2")
    runtime: str = Field("torch-distributed", description="TrainJob's ClusterTrainingRuntime")
    priority_class: str = Field("doctune-training", description="the job's pods (manifests/base/gpu-pool.yaml)")
    namespace: str | None = Field(None, description="null: the namespace the component's pod runs in")
    api_server: str | None = Field(None, description="null: in-cluster config, else ~/.kube/config")
    timeout_s: float = Field(48 * 3600.0, gt=0, description="seconds the stage waits for the job")
    poll_s: float = Field(15.0, gt=0, description="seconds between status checks")


def _default_resources() -> dict[str, Resources]:
    big = {"cpt", "sft", "dpo", "merge", "quantize", "eval_gate", "page_sft", "page_merge", "page_quantize", "page_gate"}
    documents = ("ingest", "synth", "retriever", "cpt", "sft", "dpo", "merge", "quantize", "eval_gate")
    pages = ("pages", "page_sft", "page_merge", "page_quantize", "page_gate")  # the page-extraction DAG
    return {
        stage: Resources(cpu="8", memory="64Gi") if stage in big else Resources(cpu="4", memory="16Gi")
        for stage in documents + pages
    }


def _default_secrets() -> list[SecretEnv]:
    return [
        SecretEnv(  # MLflow basic auth, where the server has it
            secret="doctune-mlflow",
            env={"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
            optional=True,
        ),
        SecretEnv(
            secret="doctune-object-store",
            env={"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"},
            optional=True,  # only where pods write artifacts to S3 directly, not through MLflow's proxy
        ),
        SecretEnv(secret="doctune-teacher", env={"api-key": "DOCTUNE_TEACHER_API_KEY"}, optional=True),
    ]


class ClusterConfig(Section):
    """How the compiled pipeline runs on a Kubeflow cluster (kfp-kubernetes); ignored by local runs."""

    host: str | None = Field(None, description="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    namespace: str | None = Field(None, description="Kubeflow profile namespace (multi-user); null: single-user")
    experiment: str = Field("doctune", description="KFP experiment the runs are filed under")
    image_registry: str = Field("ghcr.io/doctune", description="where images/ are pushed: doctune-cpu and doctune-cuda")
    image_tag: str | None = Field(None, description="null: the doctune package version")
    service_account: str = Field("doctune-pipeline", description="pipeline pods run as this (manifests/rbac.yaml)")
    caching: bool = Field(True, description="KFP task caching; stage outputs are content-addressed references")
    retries: int = Field(2, ge=0, le=10, description="retries of a failed task (node loss, preemption)")
    retry_backoff: str = Field("120s", pattern=r"^[0-9]+s$", description="first retry delay; it doubles")
    resources: dict[str, Resources] = Field(
        default_factory=_default_resources, description="per component: requests, limits default to the requests"
    )
    bookkeeping: Resources = Field(
        default_factory=lambda: Resources(cpu="500m", memory="2Gi"),
        description="open/close run, skip, promote, record rejection, deploy: MLflow and Kubernetes API calls only",
    )
    gpu: GpuPlacement = Field(default_factory=GpuPlacement, description="the GPU node pool")
    cache_volume: CacheVolume = Field(default_factory=CacheVolume, description="mounted by every pod")
    secrets: list[SecretEnv] = Field(
        default_factory=_default_secrets,
        description="Secrets as environment variables in every pod (MLflow auth, object store, teacher API); "
        "never pipeline parameters",
    )
    training_job: TrainingJobSettings = Field(default_factory=TrainingJobSettings, description="a training stage with nodes > 1")

    @field_validator("resources")
    @classmethod
    def _known_stages(cls, value: dict[str, Resources]) -> dict[str, Resources]:
        unknown = sorted(set(value) - set(_default_resources()))
        if unknown:
            raise ValueError(f"resources for unknown components {unknown}; components: {sorted(_default_resources())}")
        return {**_default_resources(), **value}
