"""The stage contract: `run(config, inputs, tracker) -> outputs`, and the one runner its three callers share.

The KFP components, the CLI and the tests all go through `execute_stage`, which opens the nested
MLflow run, records lineage, reuses an earlier identical result, and closes the run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from doctune.artifacts import ArtifactRef, refs_from_json, refs_to_json
from doctune.config import RunConfig, config_from_yaml
from doctune.tracking import TAG, Tracker, library_versions


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # defines run(config, inputs, tracker); may define external_digests(config, inputs)
    sections: tuple[str, ...]  # config sections that shape the result
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # input -> (producer stage, output)
    # Inputs a fresh run may do without (ingest reads its PDFs from config instead).
    optional_inputs: frozenset[str] = frozenset()


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec(
        name="ingest",
        module="doctune.ingest.stage",
        sections=("model", "ingest"),
        inputs={"sources": ("ingest", "sources")},
        optional_inputs=frozenset({"sources"}),
    ),
    "synth": StageSpec(
        name="synth",
        module="doctune.synth.stage",
        sections=("model", "retrieval", "synth"),
        inputs={"chunks": ("ingest", "chunks"), "pages": ("ingest", "pages")},
    ),
    "cpt": StageSpec(
        name="cpt",
        module="doctune.cpt.stage",
        sections=("model", "cpt"),
        inputs={"cpt": ("synth", "cpt")},
    ),
    "sft": StageSpec(
        name="sft",
        module="doctune.sft.stage",
        sections=("model", "sft"),
        # Without a CPT model (CPT switched off) SFT starts from model.base_model.
        inputs={"sft": ("synth", "sft"), "model": ("cpt", "model")},
        optional_inputs=frozenset({"model"}),
    ),
    "dpo": StageSpec(
        name="dpo",
        module="doctune.dpo.stage",
        sections=("model", "dpo"),
        inputs={"dpo": ("synth", "dpo"), "model": ("sft", "model")},
    ),
    "merge": StageSpec(
        name="merge",
        module="doctune.merge.stage",
        sections=("model", "merge"),
        inputs={"model": ("dpo", "model")},
    ),
    "quantize": StageSpec(
        name="quantize",
        module="doctune.quantize.stage",
        sections=("model", "cpt", "quantize"),  # cpt: its seed and eval_fraction pick the held-out text
        inputs={"model": ("merge", "model"), "cpt": ("synth", "cpt")},
    ),
    "eval_gate": StageSpec(
        name="eval_gate",
        module="doctune.gate.stage",
        sections=("model", "retrieval", "cpt", "gate"),  # cpt: its seed and eval_fraction pick the held-out text
        inputs={
            "model": ("merge", "model"),
            "quantized": ("quantize", "report"),
            "golden": ("synth", "golden"),
            "unanswerable": ("synth", "unanswerable"),
            "cpt": ("synth", "cpt"),
            "chunks": ("ingest", "chunks"),
        },
    ),
}


class StageError(RuntimeError):
    """A stage cannot start: unknown name, missing inputs, an unusable --from-run."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    run_id: str
    outputs: dict[str, ArtifactRef]
    reused_from: str | None
    seconds: float


def spec_for(name: str) -> StageSpec:
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


@cache
def code_digest() -> str:
    """sha256 over doctune's own source: any code change invalidates reuse of earlier results."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(spec: StageSpec, config: RunConfig, input_digests: dict[str, str]) -> str:
    blob = json.dumps(
        {
            "stage": spec.name,
            "config": config.digest(spec.sections),
            "inputs": input_digests,
            "code": code_digest(),
            "libraries": library_versions(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def execute_stage(
    name: str,
    config: RunConfig,
    tracker: Tracker,
    parent_run_id: str,
    inputs: dict[str, ArtifactRef],
    replaces: str | None = None,
) -> StageResult:
    spec = spec_for(name)
    unknown = sorted(set(inputs) - set(spec.inputs))
    if unknown:
        raise StageError(f"stage {name!r} takes inputs {sorted(spec.inputs)}, not {unknown}")
    missing = sorted(set(spec.inputs) - set(inputs) - spec.optional_inputs)
    if missing:
        raise StageError(f"stage {name!r} needs inputs {missing}: run its upstream stages or pass --from-run")
    module = importlib.import_module(spec.module)
    digests = {key: ref.digest for key, ref in sorted(inputs.items())}
    if hasattr(module, "external_digests"):
        digests.update(module.external_digests(config, inputs))
    key = cache_key(spec, config, digests)
    tags = {
        f"{TAG}cache_key": key,
        f"{TAG}config_digest": config.digest(),
        f"{TAG}stage_config_digest": config.digest(spec.sections),
        **{f"{TAG}upstream.{input_name}": digest for input_name, digest in digests.items()},
    }
    if replaces:
        tags[f"{TAG}replaces"] = replaces

    started = time.monotonic()
    earlier = tracker.reusable_run(name, key) if config.tracking.reuse_stage_results else None
    if earlier is not None:
        run = tracker.start_stage_run(name, parent_run_id, {**tags, f"{TAG}reused_from": earlier.info.run_id})
        outputs = tracker.outputs_of(earlier)
        run.log_params(config.flat(spec.sections))
        run.finish(outputs)
        return StageResult(name, run.run_id, outputs, earlier.info.run_id, time.monotonic() - started)

    run = tracker.start_stage_run(name, parent_run_id, tags)
    try:
        run.log_params(config.flat(spec.sections))
        run.log_text(config.to_yaml(), "config/run.yaml")
        outputs = module.run(config, inputs, run)
        seconds = time.monotonic() - started
        run.log_metrics({"stage_seconds": seconds})
    except BaseException as exc:
        run.fail(exc)
        raise
    run.finish(outputs)
    return StageResult(name, run.run_id, outputs, None, seconds)


def pipeline_run_of(tracker: Tracker, run_id: str) -> str:
    """Accept a pipeline run id, or a stage run id standing for its parent."""
    try:
        run = tracker.client.get_run(run_id)
    except Exception as exc:  # MlflowException for unknown ids, with a long server message
        raise StageError(f"--from-run {run_id}: no such run in {tracker.uri}") from exc
    tags = run.data.tags
    if tags.get(f"{TAG}kind") == "stage":
        return tags["mlflow.parentRunId"]
    if tags.get(f"{TAG}kind") != "pipeline":
        raise StageError(f"--from-run {run_id}: not a doctune pipeline or stage run")
    return run_id


def resolve_from_run(name: str, tracker: Tracker, from_run: str) -> tuple[str, dict[str, ArtifactRef], str | None]:
    """Inputs for rerunning `name` as recorded in an earlier pipeline run.

    Returns (pipeline run id, inputs, the stage run being replaced or None).
    """
    spec = spec_for(name)
    parent = pipeline_run_of(tracker, from_run)
    tags = tracker.client.get_run(parent).data.tags
    skipped = {k.removeprefix(f"{TAG}skipped."): v for k, v in tags.items() if k.startswith(f"{TAG}skipped.")}
    inputs = {}
    for input_name, (producer, output) in spec.inputs.items():
        ref = _recorded_output(tracker, parent, producer, output, skipped, input_name)
        if ref is not None:
            inputs[input_name] = ref
        elif input_name not in spec.optional_inputs:
            raise StageError(f"pipeline run {parent}: {producer!r} was switched off and hands on no {output!r} for {name!r}")
    replaced = tracker.stage_runs(parent, name)
    return parent, inputs, replaced[0].info.run_id if replaced else None


def _recorded_output(
    tracker: Tracker, parent: str, producer: str, output: str, skipped: dict[str, str], wanted: str
) -> ArtifactRef | None:
    """`output` of `producer` in a pipeline run; a switched-off producer hands on its own input of that name
    (DPO off: merge takes the SFT model; CPT off: SFT gets no model and starts from the base)."""
    runs = tracker.stage_runs(parent, producer)
    if runs:
        outputs = tracker.outputs_of(runs[0])
        if output not in outputs:
            raise StageError(f"stage run {runs[0].info.run_id} ({producer}) has no output {output!r}")
        return outputs[output]
    if skipped.get(producer) == "true":
        passed = spec_for(producer).inputs.get(output)
        return _recorded_output(tracker, parent, *passed, skipped, wanted) if passed else None
    present = sorted({r.data.tags.get(f"{TAG}stage", "?") for r in tracker.stage_runs(parent)})
    raise StageError(
        f"pipeline run {parent} has no finished {producer!r} stage run to take {wanted!r} from "
        f"(finished stages there: {present or 'none'})"
    )


# -- entry points for the thin KFP components --------------------------------


def open_pipeline_run(config_yaml: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Adopt the parent run the submitter created, or create one (scheduled runs)."""
    tracker = Tracker(config_from_yaml(config_yaml))
    if parent_run_id:
        tracker.adopt_pipeline_run(parent_run_id, kfp_run_id)
        return parent_run_id
    return tracker.open_pipeline_run(run_name=f"kfp-{kfp_run_id}", kfp_run_id=kfp_run_id)


def run_stage_component(name: str, config_yaml: str, parent_run_id: str, **upstream: str) -> str:
    """Run one stage with upstream outputs given as {producer stage: refs JSON}; returns its refs JSON."""
    config = config_from_yaml(config_yaml)
    spec = spec_for(name)
    produced = {producer: refs_from_json(text) for producer, text in upstream.items()}
    inputs = {}
    for input_name, (producer, output) in spec.inputs.items():
        if output in produced.get(producer, {}):
            inputs[input_name] = produced[producer][output]
    result = execute_stage(name, config, Tracker(config), parent_run_id, inputs)
    return refs_to_json(result.outputs)


def rerun_stage_component(name: str, config_yaml: str, from_run: str) -> str:
    """`doctune stage <name> --from-run <id>` inside a pod: a new stage run in that pipeline run, recording
    the one it replaces; returns its refs JSON."""
    config = config_from_yaml(config_yaml)
    tracker = Tracker(config)
    parent, inputs, replaced = resolve_from_run(name, tracker, from_run)
    return refs_to_json(execute_stage(name, config, tracker, parent, inputs, replaces=replaced).outputs)


def skip_stage_component(name: str, config_yaml: str, parent_run_id: str, passthrough: str) -> str:
    """A stage switched off for this run: tag the pipeline run, hand the given references on unchanged."""
    spec_for(name)
    Tracker(config_from_yaml(config_yaml)).client.set_tag(parent_run_id, f"{TAG}skipped.{name}", "true")
    return refs_to_json(refs_from_json(passthrough))


def close_pipeline_run(config_yaml: str, parent_run_id: str, kfp_run_id: str, state: str, error: str) -> None:
    tracker = Tracker(config_from_yaml(config_yaml))
    run_id = parent_run_id or tracker.pipeline_run_for_kfp(kfp_run_id)
    if run_id is None:
        raise StageError(f"no MLflow pipeline run is tagged with KFP run {kfp_run_id}")
    tracker.close_pipeline_run(run_id, succeeded=state == "SUCCEEDED", error=error)
