"""The run config: one YAML file, one section per stage; loading, layering, --set overrides and renamed keys.

Relative paths resolve against the working directory at load time and are stored absolute, so a config handed
to a KFP component means the same thing there. A file may start from another: `extends: cpu-demo.yaml` (relative
to the file) loads that one first; sections merge key by key, and lists and values replace.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from doctune.config.base import ConfigError, Section
from doctune.config.cluster import ClusterConfig
from doctune.config.deploy import DeployConfig
from doctune.config.export import MergeConfig, QuantizeConfig
from doctune.config.gate import GateConfig
from doctune.config.ingest import IngestConfig
from doctune.config.model import ModelConfig
from doctune.config.pages import PageGateConfig, PageQuantizeConfig, PagesConfig, PageSftConfig, Task
from doctune.config.project import ProjectConfig
from doctune.config.retriever import RetrieverConfig
from doctune.config.serve import FlywheelConfig, ServeConfig
from doctune.config.synth import RetrievalConfig, SynthConfig
from doctune.config.tracking import TrackingConfig
from doctune.config.training import CptConfig, DpoConfig, SftConfig

log = logging.getLogger(__name__)

EXTENDS = "extends"
# Renamed keys, old dotted path -> new: the old one keeps working for one release, with a warning.
RENAMED_KEYS = {
    "cpt.eval_fraction": "synth.heldout_fraction",
    "cpt.lr_scheduler": "cpt.lr_scheduler_type",
    "sft.lr_scheduler": "sft.lr_scheduler_type",
    "dpo.lr_scheduler": "dpo.lr_scheduler_type",
}


class RunConfig(Section):
    """A whole run: every stage's settings."""

    task: Task = Field(
        "documents",
        description="documents: PDFs to a tuned chat model (the doctune DAG); page_extraction: rendered pages to strict "
        "JSON with a vision-language model (the page-extraction DAG)",
    )
    project: ProjectConfig = Field(default_factory=ProjectConfig, description="name and local state")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the base model")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="PDFs to pages and chunks")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="contexts for RAG data and eval")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="training data and eval sets")
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig, description="the embedding model tuned on the corpus")
    cpt: CptConfig = Field(default_factory=CptConfig, description="continued pre-training")
    sft: SftConfig = Field(default_factory=SftConfig, description="supervised fine-tuning")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="preference optimisation")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="adapter merged into full weights")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="quantized variants")
    gate: GateConfig = Field(default_factory=GateConfig, description="the eval gate before promotion")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="`doctune serve`: the champion behind an endpoint")
    flywheel: FlywheelConfig = Field(
        default_factory=FlywheelConfig, description="served failures, relabeled, into the next run's training and eval data"
    )
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="the champion as a KServe InferenceService")
    pages: PagesConfig = Field(default_factory=PagesConfig, description="page track: page images and JSON labels")
    page_sft: PageSftConfig = Field(default_factory=PageSftConfig, description="page track: VLM fine-tuning")
    page_quantize: PageQuantizeConfig = Field(default_factory=PageQuantizeConfig, description="page track: quantized VLM")
    page_gate: PageGateConfig = Field(default_factory=PageGateConfig, description="page track: the eval gate")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Kubeflow placement; local runs ignore it")

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


# -- renamed keys --------------------------------------------------------------------------------------------------


def _renamed(old: str, source: str) -> str:
    new = RENAMED_KEYS[old]
    message = f"{source}: {old} is renamed {new}; the old name stops working in the next release"
    warnings.warn(message, FutureWarning, stacklevel=4)
    log.warning(message)
    return new


def rename_keys(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Move renamed keys to their new place (with a warning); both the old and the new key set is an error."""
    for old in RENAMED_KEYS:
        *parents, leaf = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        new = _renamed(old, source)
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = data
        for part in new_parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {old} is renamed {new}, but {part} is a value, not a section")
            target = child
        if new_leaf in target:
            raise ConfigError(f"{source}: sets both {old} and {new}; {old} is the old name of {new}: keep {new} only")
        target[new_leaf] = value
    return data


# -- reading YAML --------------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently): before a
    document is constructed its mappings are walked, and the first repeated key is reported with its dotted path and
    both lines. Merge keys (`<<: *anchor`) may be overridden, as YAML intends."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, "", set())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already walked (or a recursive one)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._check_keys(value_node, path, seen)
                    continue
                key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
                name = f"{path}.{key}" if path else str(key)
                try:
                    hash(key)
                except TypeError:
                    key = None
                if key is not None and key in lines:
                    raise _DuplicateKey(name, lines[key], key_node.start_mark.line + 1)
                if key is not None:
                    lines[key] = key_node.start_mark.line + 1
                self._check_keys(value_node, name, seen)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text strictly (see StrictLoader); `source` names it in the error: a file, `--set ...`."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey as dup:
        lines = f"lines {dup.first} and {dup.second}" if dup.first != dup.second else f"line {dup.first}"
        raise ConfigError(f"{source}: key {dup.key} appears twice ({lines})") from None


# -- overrides and layering ----------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set {text!r}: empty part in key path {key!r}")
    try:
        value = load_yaml(raw, f"--set {text!r}") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return _apply_overrides(data, overrides)[0]


def _apply_overrides(data: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The overrides applied, and which key path each --set wrote (the last one wins), to blame validation errors on."""
    origins: dict[tuple[str, ...], str] = {}
    for text in overrides:
        path, value = parse_override(text)
        if ".".join(path) in RENAMED_KEYS:
            path = _renamed(".".join(path), f"--set {text}").split(".")
        key = tuple(path)
        origins = {p: t for p, t in origins.items() if p[: len(key)] != key}  # replaced whole by this one
        origins[key] = text
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                by = origins.get(tuple(path[: i + 1]))
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section" + (f" (set by --set {by})" if by else ""))
            node = child
        node[path[-1]] = value
    return data, origins


def merge_layers(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key; lists and values replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_layers(out[key], value)
        else:
            out[key] = value
    return out


def _read_mapping(path: Path, named_by: str | None = None) -> dict[str, Any]:
    """The mapping in a run config file; `named_by` is the `extends:` of another file that names it."""
    where = f"{named_by}: {EXTENDS}: {path}" if named_by else f"run config {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read: {exc}") from None
    try:
        data = load_yaml(text, f"run config {path}") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"run config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"run config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_extends(
    data: dict[str, Any], base_dir: Path | None = None, source: str = "config", _seen: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """The config `data` names with `extends:` (a file, relative to base_dir), with `data` merged on top."""
    data = rename_keys(copy.deepcopy(data), source)
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{source}: {EXTENDS} must name a run config file, got {parent!r}")
    path = Path(parent).expanduser()
    path = (base_dir or Path.cwd()) / path if not path.is_absolute() else path
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{source}: {EXTENDS} goes round in a circle: {chain}")
    base = resolve_extends(_read_mapping(path, named_by=source), path.parent, str(path), (*_seen, path.resolve()))
    return merge_layers(base, data)


# -- validation ----------------------------------------------------------------------------------------------------


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


def _blame(loc: tuple[Any, ...], origins: dict[tuple[str, ...], str]) -> str:
    """' (from --set ...)' when the key at `loc` (or a section above it) was written by a --set."""
    matches = [path for path in origins if loc[: len(path)] == path]
    return f" (from --set {origins[max(matches, key=len)]})" if matches else ""


def _describe(exc: ValidationError, source: str, origins: dict[tuple[str, ...], str] | None = None) -> str:
    origins = origins or {}
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(part) for part in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {path}: unknown key{hint}{_blame(loc, origins)}")
        elif err["type"] == "trl_argument":  # further keys of a training section (doctune.config.training)
            lines.extend(f"  {path}.{key}: {reason}{_blame((*loc, key), origins)}" for key, reason in err["ctx"]["problems"])
        elif err["type"] == "model_type" and loc in origins and _allowed_keys(loc):
            # `--set ingest=5`: a whole section replaced by a value.
            lines.append(
                f"  {path}: a section, but --set {origins[loc]} makes it the value {err.get('input')!r}; "
                f"set one of its keys instead, e.g. --set {path}.{_allowed_keys(loc)[0]}=..."
            )
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {msg} (got {err.get('input')!r}){_blame(loc, origins)}")
    return f"invalid run config ({source}):\n" + "\n".join(lines)


def build_config(
    data: dict[str, Any], overrides: list[str] | None = None, source: str = "config", base_dir: Path | None = None
) -> RunConfig:
    """Validate a mapping of sections (an `extends:` file in it resolves against base_dir, default the working
    directory), with --set overrides on top."""
    data, origins = _apply_overrides(resolve_extends(data, base_dir, source), overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, origins)) from None


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run YAML (and what it extends) and apply --set overrides; no path means the library defaults."""
    if path is None:
        return build_config({}, overrides, source="defaults")
    path = Path(path)
    return build_config(_read_mapping(path), overrides, source=str(path), base_dir=path.parent)


def config_from_yaml(text: str) -> RunConfig:
    """The inverse of RunConfig.to_yaml, used by components."""
    data = load_yaml(text, "config text") or {}
    if not isinstance(data, dict):
        raise ConfigError("run config text must be a mapping of sections")
    return build_config(data, source="config text")
