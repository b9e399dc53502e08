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


class RunConfig(Section):
    project: ProjectConfig = Field(default_factory=ProjectConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)

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
