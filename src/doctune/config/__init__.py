"""The run config, one module per concern; every name is importable from `doctune.config`.

- base: Section, ConfigError
- project, tracking, model: the project's name and state, MLflow, the base model
- ingest, synth: PDFs to chunks; training data, eval sets, retrieval, teachers, replay, dedup
- training: CPT, SFT, DPO (and the further TRL arguments they pass on)
- export: merge and quantize
- pages: the page-extraction track (task: page_extraction): pages, page_sft, page_quantize, page_gate
- gate: the eval gate and its rules
- serve: `doctune serve`, the champion behind an endpoint; flywheel: its logs back into training
- deploy: `doctune deploy`, the champion as a KServe InferenceService on a cluster
- cluster: Kubeflow placement
- run: RunConfig, loading, layering (`extends:`), --set overrides, renamed keys
- reference: writes configs/default.yaml and docs/config.md from these (`make config-docs`)
"""

from doctune.config.base import ConfigError, Section
from doctune.config.cluster import (
    CacheVolume,
    ClusterConfig,
    GpuPlacement,
    Resources,
    SecretEnv,
    Toleration,
    TrainingJobSettings,
)
from doctune.config.deploy import DeployConfig
from doctune.config.export import MergeConfig, QuantizeConfig
from doctune.config.gate import GateConfig, GateRules, JudgeConfig
from doctune.config.ingest import ChunkingConfig, IngestConfig
from doctune.config.model import ModelConfig
from doctune.config.pages import PageGateConfig, PageQuantizeConfig, PagesConfig, PageSftConfig
from doctune.config.project import ProjectConfig
from doctune.config.retriever import RetrieverConfig
from doctune.config.run import (
    RENAMED_KEYS,
    RunConfig,
    apply_overrides,
    build_config,
    config_from_yaml,
    load_config,
    merge_layers,
    parse_override,
    rename_keys,
    resolve_extends,
)
from doctune.config.serve import FlywheelConfig, ServeConfig
from doctune.config.synth import (
    DedupConfig,
    EndpointConfig,
    LocalTeacherConfig,
    ReplayConfig,
    RetrievalConfig,
    SynthConfig,
)
from doctune.config.tracking import TrackingConfig
from doctune.config.training import (
    TRAINING_SECTIONS,
    CptConfig,
    DeepSpeedSettings,
    DpoConfig,
    LoraSettings,
    RopeScalingSettings,
    SftConfig,
    TrainingConfig,
    trl_arguments,
)

__all__ = [
    "RENAMED_KEYS",
    "TRAINING_SECTIONS",
    "CacheVolume",
    "ChunkingConfig",
    "ClusterConfig",
    "ConfigError",
    "CptConfig",
    "DedupConfig",
    "DeepSpeedSettings",
    "DeployConfig",
    "DpoConfig",
    "EndpointConfig",
    "FlywheelConfig",
    "GateConfig",
    "GateRules",
    "GpuPlacement",
    "IngestConfig",
    "JudgeConfig",
    "LocalTeacherConfig",
    "LoraSettings",
    "MergeConfig",
    "ModelConfig",
    "PageGateConfig",
    "PageQuantizeConfig",
    "PageSftConfig",
    "PagesConfig",
    "ProjectConfig",
    "QuantizeConfig",
    "ReplayConfig",
    "Resources",
    "RetrievalConfig",
    "RetrieverConfig",
    "RopeScalingSettings",
    "RunConfig",
    "SecretEnv",
    "Section",
    "ServeConfig",
    "SftConfig",
    "SynthConfig",
    "Toleration",
    "TrackingConfig",
    "TrainingConfig",
    "TrainingJobSettings",
    "apply_overrides",
    "build_config",
    "config_from_yaml",
    "load_config",
    "merge_layers",
    "parse_override",
    "rename_keys",
    "resolve_extends",
    "trl_arguments",
]
