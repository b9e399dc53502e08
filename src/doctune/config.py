"""The run config: one YAML file, one section per stage, validated by pydantic.

Relative paths resolve against the working directory at load time and are stored
absolute, so a config handed to a KFP component means the same thing there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ProjectConfig(Section):
    name: str = Field("doctune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # Local state: the sqlite tracking store, artifacts, model and fetch caches.
    workdir: Path = Path(".doctune")

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()


class TrackingConfig(Section):
    # None: a sqlite store under project.workdir, no server needed.
    uri: str | None = None
    experiment: str | None = None
    # Reuse a stage's outputs when its config, inputs and code are unchanged.
    reuse_stage_results: bool = True


class ModelConfig(Section):
    # bundled:<name>, a local folder, or a hub id where a hub is reachable.
    base_model: str = "bundled:smollm2-135m-instruct"


class ChunkingConfig(Section):
    mode: Literal["tokens", "sections"] = "sections"
    size: int = Field(384, gt=0, description="tokens per chunk")
    overlap: int = Field(48, ge=0, description="tokens shared by consecutive windows")
    min_tokens: int = Field(48, ge=1, description="smaller chunks merge into a neighbour")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingConfig:
        if self.overlap >= self.size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than size ({self.size})")
        if self.min_tokens > self.size:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed size ({self.size})")
        return self


class IngestConfig(Section):
    pdfs: Path = Path("../shared/corpus")
    workers: int = Field(0, ge=0, description="worker processes; 0 = one per CPU core")
    ocr: Literal["auto", "always", "never"] = "auto"
    ocr_language: str = "eng"
    ocr_dpi: int = Field(300, ge=72, le=1200)
    # A page with fewer characters than this after cleaning has no usable text.
    min_page_chars: int = Field(16, ge=0)
    # A top/bottom line that recurs on this many pages is page furniture.
    furniture_min_repeats: int = Field(3, ge=2)
    furniture_lines: int = Field(2, ge=1, le=5, description="lines examined at each page edge")
    # Characters sampled per document for language detection.
    lang_sample_chars: int = Field(4000, ge=200)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)

    @field_validator("pdfs")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()


class RetrievalConfig(Section):
    """How contexts are retrieved: shared by the RAG training data and the eval, so both see the same."""

    embedding_model: str = "bundled:all-minilm-l6-v2"
    # Two 384-token passages: a prompt the bundled 135M model trains on whole within sft.max_length; four were cut.
    top_k: int = Field(2, ge=1, le=32, description="passages per context")


class EndpointConfig(Section):
    """An OpenAI-compatible chat API (vLLM, TGI, llama.cpp server, ...)."""

    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "default"
    api_key_env: str = Field("DOCTUNE_TEACHER_API_KEY", description="environment variable holding the key; never logged")
    max_concurrency: int = Field(4, ge=1, le=256)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int = Field(768, ge=16)
    # json_object (+ schema: llama.cpp, vLLM), json_schema (OpenAI structured outputs) or none.
    response_format: Literal["json_object", "json_schema", "none"] = "json_object"


class LocalTeacherConfig(Section):
    model: str = "bundled:smollm2-135m-instruct"
    max_new_tokens: int = Field(384, ge=16)


class ReplayConfig(Section):
    """General text mixed into CPT against forgetting."""

    share: float = Field(0.2, ge=0, lt=1, description="share of CPT characters that is replay text")
    # A JSONL/Parquet dataset with a "text" column; null: the base model's own answers to shipped general prompts.
    dataset: Path | None = None
    max_new_tokens: int = Field(160, ge=8)
    # Replies sampled at 1.0 follow the base model's own distribution, so training on them keeps it. Greedy replies
    # (0) are its most likely tokens only: as 10% of SFT they sharpened the bundled model (general-text entropy
    # 2.64 -> 2.13 nats) and raised its general perplexity to 1.14x base; SFT without rehearsal gave 1.05x.
    temperature: float = Field(1.0, ge=0, le=2, description="sampling temperature of the base model's replies; 0 = greedy")
    batch_size: int = Field(64, ge=1, description="prompts generated together (decoding is what costs: larger is faster)")
    max_prompts: int = Field(0, ge=0, description="use the first N shipped prompts; 0 = all")
    # The base model's own replies also join SFT as chats (self-distillation): without them, 64 SFT steps at the
    # small-model learning rate cost the bundled 135M model 16% of its capability-probe accuracy (0.211 -> 0.178).
    # Sampled replies are high-loss tokens that compete with the domain answers for the clipped update: at 10% of
    # SFT, golden F1 fell from 0.240 (greedy replies) to 0.190; 5% halves that noise.
    sft_share: float = Field(
        0.05, ge=0, lt=0.5, description="share of SFT training examples that are rehearsal chats (shipped prompts only)"
    )

    @field_validator("dataset")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value else None


class DedupConfig(Section):
    minhash_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of question shingles")
    minhash_permutations: int = Field(64, ge=16, le=512)
    embedding_threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity of question embeddings")


class SynthConfig(Section):
    teacher: Literal["extractive", "endpoint", "local"] = "extractive"
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    local: LocalTeacherConfig = Field(default_factory=LocalTeacherConfig)
    min_questions: int = Field(3, ge=1, le=8, description="per chunk, asked of LLM teachers")
    max_questions: int = Field(8, ge=1, le=16)
    split_by: Literal["chunk", "document"] = "chunk"
    eval_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of chunks (or documents) held out for eval sets")
    validation_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of training chunks for validation splits")
    abstention_share: float = Field(0.175, ge=0.15, le=0.2, description="share of SFT examples that abstain")
    rag_share: float = Field(0.8, ge=0, le=1, description="share of answerable SFT examples with retrieved context")
    unanswerable_share: float = Field(0.4, gt=0, lt=1, description="share of held-out questions turned unanswerable")
    judge: bool = Field(False, description="pairwise-judge DPO pairs through the endpoint, both orders")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    ngram: int = Field(8, ge=4, le=32, description="n for the golden/training contamination check")
    max_contamination: float = Field(0.0, ge=0, le=1)
    languages: list[str] = Field(default_factory=lambda: ["en"], description="documents in other languages are dropped")
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    seed: int = 13

    @model_validator(mode="after")
    def _question_range(self) -> SynthConfig:
        if self.min_questions > self.max_questions:
            raise ValueError(f"min_questions ({self.min_questions}) must not exceed max_questions ({self.max_questions})")
        return self


class LoraSettings(Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear layer but the output head; or module-name suffixes such as [q_proj, v_proj].
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DeepSpeedSettings(Section):
    """ZeRO-3 for `full` fine-tunes over more than one process; the JSON config is generated from these."""

    offload_optimizer: bool = False
    offload_params: bool = False


class TrainingConfig(Section):
    """What every training stage shares; the CPT and SFT sections extend it."""

    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float | None = Field(None, gt=0, description="null: the stage's default for the method")
    epochs: float = Field(1.0, gt=0)
    # The embedded defaults are sized for a 2-core CPU run (`make run`); on GPUs set 0 and train by epochs.
    max_steps: int = Field(16, ge=0, description="optimizer steps; 0 = as many as the epochs take")
    batch_size: int = Field(2, ge=1, description="sequences (packed rows) per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 where the GPU supports it, else fp16 on GPU; on CPU bf16 autocast for LoRA with AMX, else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    save_steps: int = Field(8, ge=1, description="checkpoint every N optimizer steps")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best one is kept besides)")
    logging_steps: int = Field(2, ge=1)
    # Training processes: 0 = one per visible GPU (one on CPU). More than one: DDP, or DeepSpeed ZeRO-3 for `full`.
    processes: int = Field(0, ge=0, le=64)
    # More than one: `full` only; a Kubeflow training job (cluster.training_job) runs `processes` ranks on each node.
    nodes: int = Field(1, ge=1, le=512)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    seed: int = 42

    @model_validator(mode="after")
    def _nodes_need_full(self) -> TrainingConfig:
        if self.nodes > 1 and self.method != "full":
            raise ValueError(f"nodes ({self.nodes}) > 1 needs method full (ZeRO-3), not {self.method}")
        return self


class RopeScalingSettings(Section):
    type: Literal["none", "linear", "dynamic", "yarn"] = "none"
    factor: float = Field(1.0, ge=1.0, description="context multiplier; max_position_embeddings grows by it")


class CptConfig(TrainingConfig):
    enabled: bool = Field(True, description="off: SFT starts from model.base_model")
    block_size: int = Field(512, ge=16, description="tokens per packed training block")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of domain texts held out for perplexity")
    max_eval_blocks: int = Field(16, ge=1, description="held-out blocks scored before and after (CPU time)")
    rope_scaling: RopeScalingSettings = Field(default_factory=RopeScalingSettings)


class SftConfig(TrainingConfig):
    # Sized for the 2-core `make run`: SFT gets the most of its minutes (the gate's F1 moves with SFT steps).
    max_steps: int = Field(80, ge=0, description="optimizer steps; 0 = as many as the epochs take")
    save_steps: int = Field(40, ge=1, description="checkpoint every N optimizer steps")
    max_length: int = Field(1024, ge=16, description="tokens per example; longer prompts are cut from the front")
    packing: bool = Field(True, description="pack examples into max_length rows without cross-example attention")
    eval_steps: int = Field(40, ge=1, description="evaluate on the validation split every N steps")
    max_eval_examples: int = Field(32, ge=1, description="validation examples scored at each evaluation (CPU time)")

    @model_validator(mode="after")
    def _save_on_eval_steps(self) -> SftConfig:
        if self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}): "
                "the best checkpoint is chosen among evaluated ones"
            )
        return self


class DpoConfig(TrainingConfig):
    enabled: bool = Field(True, description="off: merge takes the SFT model")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference policy")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    # method full only: a frozen reference copy in memory, or its log-probs computed once before training.
    reference: Literal["copy", "precomputed"] = "copy"
    # Sized for the 2-core `make run`: a DPO step scores chosen and rejected under policy and reference.
    max_steps: int = Field(8, ge=0, description="optimizer steps; 0 = as many as the epochs take")
    save_steps: int = Field(8, ge=1, description="checkpoint every N optimizer steps")
    max_length: int = Field(1024, ge=16, description="tokens of prompt + reply; longer prompts are cut in the middle")
    eval_steps: int = Field(8, ge=1, description="reward accuracy on the validation pairs every N steps")
    max_eval_pairs: int = Field(8, ge=1, description="validation pairs scored at each evaluation (CPU time)")


class MergeConfig(Section):
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a GPU, fp32 on CPU")
    max_logit_diff: float | None = Field(
        None, gt=0, description="largest |logit| gap allowed between adapter and merged model; null: 1e-3 fp32, 0.5 bf16"
    )
    verify_prompts: list[str] = Field(
        default_factory=lambda: [
            "What does the package manager do when a dependency is missing?",
            "Summarize the installation steps in two sentences.",
            "Which command shows the installed version?",
            "Tell me about the weather on Mars.",
        ],
        min_length=1,
        description="user turns (with the model's system prompt) whose logits must agree before and after merging",
    )


class QuantizeConfig(Section):
    variants: list[str] = Field(
        default_factory=lambda: ["gguf-f16", "gguf-q8_0", "gguf-q4_0", "nf4"],
        min_length=1,
        description="gguf-<ggml type> (f16, bf16, q8_0, q5_0, q4_0, ...) for llama.cpp/Ollama; nf4 (bitsandbytes) for GPUs",
    )
    eval_blocks: int = Field(8, ge=1, description="held-out domain blocks scored by every variant (CPU time)")
    block_size: int = Field(256, ge=16, description="tokens per perplexity block")
    generate_tokens: int = Field(32, ge=1, description="greedy tokens generated per check (and timed)")
    prompt: str = Field("How do I install a package?", description="user turn of the generation check")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: list[str]) -> list[str]:
        odd = [v for v in variants if v != "nf4" and not (v.startswith("gguf-") and v[5:].replace("_", "").isalnum())]
        if odd:
            raise ValueError(f"variants {odd}: expected gguf-<ggml type> or nf4")
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants listed twice: {variants}")
        return variants


class GateRules(Section):
    min_f1_vs_champion: float = Field(0.98, gt=0, description="candidate golden F1 >= this x champion's")
    beat_base: bool = Field(True, description="candidate golden F1 must be significantly above the base model's (p < alpha)")
    abstention_tolerance: float = Field(0.02, ge=0, le=1, description="abstention accuracy >= champion's minus this")
    min_format_compliance: float = Field(
        0.95, ge=0, le=1, description="share of structured-output probes that validate; the base model's share where lower"
    )
    min_probes_vs_base: float = Field(0.95, ge=0, description="capability probe accuracy >= this x base's")
    max_general_ppl_vs_base: float = Field(1.15, gt=0, description="general-text perplexity <= this x base's")
    max_quantized_ppl_ratio: float = Field(1.02, gt=0, description="each gated variant's perplexity <= this x merged")
    alpha: float = Field(0.05, gt=0, lt=1, description="significantly worse than the champion (paired test) rejects")
    permutations: int = Field(10000, ge=100, description="sign flips of the paired randomization test")


class GateConfig(Section):
    variants: list[str] = Field(
        default_factory=lambda: ["gguf-q8_0"],
        description="quantized variants that ship with a promoted version: evaluated like the merged model, held to "
        "max_quantized_ppl_ratio (the others are reported only)",
    )
    # Enough items for the paired tests to see a real difference (CPU time grows with them).
    max_golden: int = Field(64, ge=1, description="golden questions scored per model (CPU time)")
    max_unanswerable: int = Field(32, ge=1)
    max_new_tokens: int = Field(64, ge=1, description="greedy tokens per answer")
    batch_size: int = Field(8, ge=1, description="prompts generated together (transformers)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="weights of the transformers models scored (all in the same precision): auto is bf16 where the "
        "hardware multiplies it (a bf16 GPU, a CPU with AMX: 2.2x fp32 there), fp32 elsewhere",
    )
    perplexity_blocks: int = Field(8, ge=1, description="blocks of held-out domain text and of general text")
    block_size: int = Field(256, ge=16)
    retrieval_k: int = Field(10, ge=1, description="cut-off of Recall@k and NDCG@k")
    samples: int = Field(5, ge=0, description="answers shown side by side in the report")
    rules: GateRules = Field(default_factory=GateRules)


class Resources(Section):
    """Kubernetes requests and limits of one component's pod (limits default to the requests)."""

    cpu: str = Field("2", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str = Field("8Gi", pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$")
    cpu_limit: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory_limit: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$")


class Toleration(Section):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class GpuPlacement(Section):
    """Where GPU components run: accelerator, count, and the GPU node pool's label and taint."""

    stages: list[str] = Field(
        default_factory=lambda: ["cpt", "sft", "dpo", "merge", "quantize"], description="components placed on the GPU pool"
    )
    accelerator_type: str = Field("nvidia.com/gpu", description="resource name; set_accelerator_type")
    count: int = Field(1, ge=1, le=16, description="GPUs per pod; set_accelerator_limit")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"doctune.io/pool": "gpu"})
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")])


class CacheVolume(Section):
    """Model and dataset caches (and the stages' workdir) of every pod."""

    kind: Literal["pvc", "ephemeral"] = Field("pvc", description="pvc: shared and kept (manifests/); ephemeral: per pod")
    name: str = Field("doctune-model-cache", description="PVC name (kind pvc)")
    mount_path: str = "/var/cache/doctune"
    size: str = Field("100Gi", description="kind ephemeral: requested size")
    storage_class: str | None = Field(None, description="kind ephemeral: storage class; null: the cluster default")


class SecretEnv(Section):
    """Keys of one Kubernetes Secret exposed to every pod as environment variables."""

    secret: str
    env: dict[str, str] = Field(description="secret key -> environment variable")
    optional: bool = Field(False, description="pods start without it (e.g. no teacher API, no MLflow auth)")


class TrainingJobSettings(Section):
    """A training stage with nodes > 1 creates this Kubeflow job through the Kubernetes API and waits for it."""

    kind: Literal["PyTorchJob", "TrainJob"] = Field("PyTorchJob", description="TrainJob: Kubeflow Trainer v2")
    runtime: str = Field("torch-distributed", description="TrainJob's ClusterTrainingRuntime")
    priority_class: str = Field("doctune-training", description="the job's pods (manifests/base/gpu-pool.yaml)")
    namespace: str | None = Field(None, description="null: the namespace the component's pod runs in")
    api_server: str | None = Field(None, description="null: in-cluster config, else ~/.kube/config")
    timeout_s: float = Field(48 * 3600.0, gt=0)
    poll_s: float = Field(15.0, gt=0)


def _default_resources() -> dict[str, Resources]:
    big = {"cpt", "sft", "dpo", "merge", "quantize", "eval_gate"}
    return {
        stage: Resources(cpu="8", memory="64Gi") if stage in big else Resources(cpu="4", memory="16Gi")
        for stage in ("ingest", "synth", "cpt", "sft", "dpo", "merge", "quantize", "eval_gate")
    }


class ClusterConfig(Section):
    """How the compiled pipeline runs on a Kubeflow cluster (kfp-kubernetes); ignored by local runs."""

    host: str | None = Field(None, description="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    namespace: str | None = Field(None, description="Kubeflow profile namespace (multi-user); null: single-user")
    experiment: str = "doctune"
    image_registry: str = "ghcr.io/doctune"
    image_tag: str | None = Field(None, description="null: the doctune package version")
    service_account: str = Field("doctune-pipeline", description="pipeline pods run as this (manifests/rbac.yaml)")
    caching: bool = Field(True, description="KFP task caching; stage outputs are content-addressed references")
    retries: int = Field(2, ge=0, le=10, description="retries of a failed task (node loss, preemption)")
    retry_backoff: str = Field("120s", pattern=r"^[0-9]+s$")
    resources: dict[str, Resources] = Field(default_factory=_default_resources)
    bookkeeping: Resources = Field(
        default_factory=lambda: Resources(cpu="500m", memory="2Gi"),
        description="open/close run, skip, promote, record rejection: MLflow calls only",
    )
    gpu: GpuPlacement = Field(default_factory=GpuPlacement)
    cache_volume: CacheVolume = Field(default_factory=CacheVolume)
    secrets: list[SecretEnv] = Field(
        default_factory=lambda: [
            SecretEnv(
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
        ],
        description="Secrets as environment variables in every pod; never pipeline parameters",
    )
    training_job: TrainingJobSettings = Field(default_factory=TrainingJobSettings)

    @field_validator("resources")
    @classmethod
    def _known_stages(cls, value: dict[str, Resources]) -> dict[str, Resources]:
        unknown = sorted(set(value) - set(_default_resources()))
        if unknown:
            raise ValueError(f"resources for unknown components {unknown}; components: {sorted(_default_resources())}")
        return {**_default_resources(), **value}


class RunConfig(Section):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    cpt: CptConfig = Field(default_factory=CptConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.project.workdir / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.project.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """sha256 of the canonical JSON of the whole config or of some sections."""
        data = self.model_dump(mode="json")
        if sections is not None:
            data = {name: data[name] for name in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def flat(self, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        data = self.model_dump(mode="json")
        if sections is not None:
            data = {name: data[name] for name in sections}
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", data)
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set {text!r}: empty part in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _allowed_keys(loc: tuple[Any, ...]) -> list[str] | None:
    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return list(model.model_fields)


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(part) for part in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {msg} (got {err.get('input')!r})")
    return f"invalid run config ({source}):\n" + "\n".join(lines)


def build_config(data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> RunConfig:
    data = apply_overrides(dict(data), overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML and apply --set overrides; no path means the built-in defaults."""
    if path is None:
        return build_config({}, overrides, source="defaults")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"run config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"run config {path} must be a mapping of sections, got {type(data).__name__}")
    return build_config(data, overrides, source=str(path))


def config_from_yaml(text: str) -> RunConfig:
    """The inverse of RunConfig.to_yaml, used by components."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError("run config text must be a mapping of sections")
    return build_config(data, source="config text")
