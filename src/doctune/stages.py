"""The stage contract: `run(config, inputs, tracker) -> outputs`, and the one runner its three callers share.

The KFP components, the CLI and the tests all go through `execute_stage`, which opens the nested
MLflow run, records lineage, reuses an earlier identical result, and closes the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from doctune import cache
from doctune.artifacts import WEIGHT_KINDS, ArtifactRef, refs_from_json, refs_to_json
from doctune.code_digest import code_digest
from doctune.config import RunConfig, config_from_yaml
from doctune.processes import die_with_parent, stop_on_signals, stopped_by
from doctune.tracking import TAG, Tracker, library_versions


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # defines run(config, inputs, tracker); may define external_digests(config, inputs)
    sections: tuple[str, ...]  # config sections that shape the result
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # input -> (producer stage, output)
    # Inputs a fresh run may do without (ingest reads its PDFs from config instead).
    optional_inputs: frozenset[str] = frozenset()
    # The component's arguments: each carries one upstream component's references (refs JSON), named by what this
    # stage takes from it -> the producer stage.
    params: dict[str, str] = field(default_factory=dict)
    # Typed KFP outputs the component declares -> (the stage output it describes, or "" for the stage run itself;
    # its KFP kind: dataset, model, metrics, html or markdown).
    kfp_outputs: dict[str, tuple[str, str]] = field(default_factory=dict)

    def code_digest(self) -> str:
        """sha256 of the stage module and every doctune module it imports (not the whole package)."""
        return code_digest(self.module)


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec(
        name="ingest",
        module="doctune.ingest.stage",
        sections=("model", "ingest"),
        inputs={"sources": ("ingest", "sources")},
        optional_inputs=frozenset({"sources"}),
        kfp_outputs={
            "pages_dataset": ("pages", "dataset"),
            "chunks_dataset": ("chunks", "dataset"),
            "ingest_report": ("report", "markdown"),
        },
    ),
    "synth": StageSpec(
        name="synth",
        module="doctune.synth.stage",
        sections=("model", "retrieval", "synth"),
        inputs={"chunks": ("ingest", "chunks"), "pages": ("ingest", "pages")},
        params={"documents": "ingest"},
        kfp_outputs={
            "cpt_dataset": ("cpt", "dataset"),
            "heldout_dataset": ("heldout", "dataset"),
            "sft_dataset": ("sft", "dataset"),
            "dpo_dataset": ("dpo", "dataset"),
            "golden_dataset": ("golden", "dataset"),
            "unanswerable_dataset": ("unanswerable", "dataset"),
            "synth_report": ("report", "markdown"),
        },
    ),
    "retriever": StageSpec(
        name="retriever",
        module="doctune.retriever.stage",
        sections=("retrieval", "retriever"),
        inputs={
            "chunks": ("ingest", "chunks"),
            "pages": ("ingest", "pages"),
            "sft": ("synth", "sft"),
            "golden": ("synth", "golden"),
        },
        params={"datasets": "synth", "documents": "ingest"},
        kfp_outputs={
            "embedding_model": ("model", "model"),
            "chunk_index": ("index", "dataset"),
            "retriever_report": ("report", "markdown"),
        },
    ),
    "cpt": StageSpec(
        name="cpt",
        module="doctune.cpt.stage",
        sections=("model", "cpt"),
        inputs={"cpt": ("synth", "cpt"), "heldout": ("synth", "heldout")},
        optional_inputs=frozenset({"heldout"}),  # without it CPT trains with no before/after perplexity
        params={"datasets": "synth"},
        kfp_outputs={"adapted_model": ("model", "model"), "training_metrics": ("", "metrics")},
    ),
    "sft": StageSpec(
        name="sft",
        module="doctune.sft.stage",
        sections=("model", "sft"),
        # Without a CPT model (CPT switched off) SFT starts from model.base_model.
        inputs={"sft": ("synth", "sft"), "model": ("cpt", "model")},
        optional_inputs=frozenset({"model"}),
        params={"datasets": "synth", "model": "cpt"},
        kfp_outputs={"tuned_model": ("model", "model"), "training_metrics": ("", "metrics")},
    ),
    "dpo": StageSpec(
        name="dpo",
        module="doctune.dpo.stage",
        sections=("model", "dpo"),
        inputs={"dpo": ("synth", "dpo"), "model": ("sft", "model")},
        params={"datasets": "synth", "model": "sft"},
        kfp_outputs={"aligned_model": ("model", "model"), "training_metrics": ("", "metrics")},
    ),
    "merge": StageSpec(
        name="merge",
        module="doctune.merge.stage",
        sections=("model", "merge"),
        inputs={"model": ("dpo", "model")},
        params={"model": "dpo"},
        kfp_outputs={"merged_model": ("model", "model"), "merge_metrics": ("", "metrics")},
    ),
    "quantize": StageSpec(
        name="quantize",
        module="doctune.quantize.stage",
        sections=("model", "quantize"),
        inputs={"model": ("merge", "model"), "heldout": ("synth", "heldout"), "cpt": ("synth", "cpt")},
        optional_inputs=frozenset({"cpt"}),  # the importance matrix's text: without it the K-quants are unweighted
        params={"model": "merge", "datasets": "synth"},
        kfp_outputs={"quantize_report": ("report", "dataset"), "quantize_metrics": ("", "metrics")},
    ),
    "eval_gate": StageSpec(
        name="eval_gate",
        module="doctune.gate.stage",
        sections=("model", "retrieval", "gate"),
        inputs={
            "model": ("merge", "model"),
            "quantized": ("quantize", "report"),
            "golden": ("synth", "golden"),
            "unanswerable": ("synth", "unanswerable"),
            "heldout": ("synth", "heldout"),
            "chunks": ("ingest", "chunks"),
            "retriever": ("retriever", "report"),
            "retriever_index": ("retriever", "index"),
            "retriever_model": ("retriever", "model"),
        },
        # Retriever off: the gate compares the base embedder with BM25, and the version carries no index to serve.
        optional_inputs=frozenset({"retriever", "retriever_index", "retriever_model"}),
        params={"model": "merge", "quantized": "quantize", "datasets": "synth", "documents": "ingest", "retriever": "retriever"},
        kfp_outputs={"gate_report": ("report", "html"), "gate_metrics": ("", "metrics")},
    ),
    # The page-extraction track (task: page_extraction): its own DAG, pipelines/page_extraction_pipeline.py.
    "pages": StageSpec(
        name="pages",
        module="doctune.pages.stage",
        sections=("pages",),
        kfp_outputs={"page_dataset": ("dataset", "dataset"), "pages_report": ("report", "markdown")},
    ),
    "page_sft": StageSpec(
        name="page_sft",
        module="doctune.page_sft.stage",
        sections=("model", "pages", "page_sft"),
        inputs={"pages": ("pages", "dataset")},
        params={"pages": "pages"},
        kfp_outputs={"tuned_model": ("model", "model"), "training_metrics": ("", "metrics")},
    ),
    "page_merge": StageSpec(
        name="page_merge",
        module="doctune.page_merge.stage",
        sections=("model", "merge"),
        inputs={"model": ("page_sft", "model"), "pages": ("pages", "dataset")},
        params={"model": "page_sft", "pages": "pages"},
        kfp_outputs={"merged_model": ("model", "model"), "merge_metrics": ("", "metrics")},
    ),
    "page_quantize": StageSpec(
        name="page_quantize",
        module="doctune.page_quantize.stage",
        sections=("model", "page_quantize"),
        inputs={"model": ("page_merge", "model"), "pages": ("pages", "dataset")},
        params={"model": "page_merge", "pages": "pages"},
        kfp_outputs={"quantize_report": ("report", "dataset"), "quantize_metrics": ("", "metrics")},
    ),
    "page_gate": StageSpec(
        name="page_gate",
        module="doctune.gate.page_stage",
        sections=("model", "page_gate"),
        inputs={"model": ("page_merge", "model"), "quantized": ("page_quantize", "report"), "pages": ("pages", "dataset")},
        params={"model": "page_merge", "quantized": "page_quantize", "pages": "pages"},
        kfp_outputs={"gate_report": ("report", "html"), "gate_metrics": ("", "metrics")},
    ),
}


CACHE_ENTRIES_FILE = "cache_entries.json"


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


def cache_key(spec: StageSpec, config: RunConfig, input_digests: dict[str, str]) -> str:
    blob = json.dumps(
        {
            "stage": spec.name,
            "config": config.digest(spec.sections),
            "inputs": input_digests,
            "code": spec.code_digest(),
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
        try:
            run.log_params(config.flat(spec.sections))
            verify_reused(tracker, inputs, outputs)
        except BaseException as exc:
            _fail(run, exc)
            raise
        run.finish(outputs)
        return StageResult(name, run.run_id, outputs, earlier.info.run_id, time.monotonic() - started)

    run = tracker.start_stage_run(name, parent_run_id, tags)
    cache.forget_used()
    try:
        with cache.in_use(tracker.cache.root):
            run.log_params(config.flat(spec.sections))
            run.log_text(config.to_yaml(), "config/run.yaml")
            outputs = module.run(config, inputs, run)
        seconds = time.monotonic() - started
        run.log_metrics({"stage_seconds": seconds})
        _record_cache_use(run)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the stage's own error is the one to report
            _record_cache_use(run)
        _fail(run, exc)
        raise
    run.finish(outputs)
    return StageResult(name, run.run_id, outputs, None, seconds)


def _record_cache_use(run) -> None:
    """The cache entries this stage used: what `doctune cache prune` keeps for it."""
    run.log_text(json.dumps(cache.used_entries(), indent=0), CACHE_ENTRIES_FILE)


def _fail(run, exc: BaseException) -> None:
    """Close a stage run that did not finish: KILLED when the process was asked to stop, else FAILED."""
    run.fail(exc)
    if stopped_by(exc):
        run.client.set_terminated(run.run_id, "KILLED")


def verify_reused(tracker: Tracker, inputs: dict[str, ArtifactRef], outputs: dict[str, ArtifactRef]) -> None:
    """An earlier result is handed on only while the store still holds what its references promise: the inputs'
    and outputs' manifests and file sizes, and every byte of model weights."""
    for ref in inputs.values():
        tracker.verify_stored(ref)
    for ref in outputs.values():
        tracker.verify_stored(ref, full=ref.kind in WEIGHT_KINDS)


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


def cache_entries_in_use(tracker: Tracker) -> set[str]:
    """Cache entries (kind/name) some run of this tracking store still references: the artifacts its stage runs
    consumed and produced, and what each recorded as used (training merges, bundled models, embeddings...). Every
    experiment counts (projects may share a work directory); a record that exists but cannot be read stops the
    prune, since what it protects is unknown."""
    entries: set[str] = set()
    experiments = [e.experiment_id for e in tracker.client.search_experiments()]
    for run in _all_runs(tracker, experiments, f"tags.`{TAG}kind` = 'stage'"):
        tags = run.data.tags
        digests = [v for k, v in tags.items() if k.startswith((f"{TAG}output.", f"{TAG}upstream."))]
        entries |= {f"artifacts/{d.replace(':', '-')}" for d in digests if d.startswith("sha256:")}
        if not any(f.path == CACHE_ENTRIES_FILE for f in tracker.client.list_artifacts(run.info.run_id)):
            continue  # a run from before entries were recorded, or one killed before it could record them
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = tracker.client.download_artifacts(run.info.run_id, CACHE_ENTRIES_FILE, tmp)
                entries |= set(json.loads(Path(local).read_text()))
            except Exception as exc:
                raise StageError(f"cannot read the cache record of run {run.info.run_id} ({exc}); nothing was removed") from None
    return entries


def _all_runs(tracker: Tracker, experiments: list[str], query: str):
    token = None
    while True:
        page = tracker.client.search_runs(experiments, filter_string=query, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


# -- entry points for the thin KFP components --------------------------------


def open_pipeline_run(config_yaml: str, parent_run_id: str, kfp_run_id: str) -> str:
    """Adopt the parent run the submitter created, or create one (scheduled runs)."""
    tracker = Tracker(config_from_yaml(config_yaml))
    if parent_run_id:
        tracker.adopt_pipeline_run(parent_run_id, kfp_run_id)
        return parent_run_id
    return tracker.open_pipeline_run(run_name=f"kfp-{kfp_run_id}", kfp_run_id=kfp_run_id)


def run_stage_component(name: str, config_yaml: str, parent_run_id: str, kfp_outputs: dict | None = None, **upstream: str) -> str:
    """Run one stage; `upstream` maps the component's arguments (spec.params) to the refs JSON they carry.
    `kfp_outputs` (the component's typed KFP output artifacts by name) are described from the result.
    Returns the stage's refs JSON."""
    config = config_from_yaml(config_yaml)
    spec = spec_for(name)
    unknown = sorted(set(upstream) - set(spec.params))
    if unknown:
        raise StageError(f"component {name!r} takes {sorted(spec.params)}, not {unknown}")
    produced = {spec.params[param]: refs_from_json(text) for param, text in upstream.items()}
    inputs = {}
    for input_name, (producer, output) in spec.inputs.items():
        if output in produced.get(producer, {}):
            inputs[input_name] = produced[producer][output]
    tracker = Tracker(config)
    with stop_on_signals(end_children_first=True):
        die_with_parent()
        result = execute_stage(name, config, tracker, parent_run_id, inputs)
    describe_kfp_outputs(spec, result, tracker, kfp_outputs or {})
    return refs_to_json(result.outputs)


def describe_kfp_outputs(spec: StageSpec, result: StageResult, tracker: Tracker, artifacts: dict) -> None:
    """Fill a component's typed KFP outputs from a stage result, so Kubeflow's UI and metadata store show lineage,
    metrics and reports: datasets and models point at the MLflow artifact (URI) and carry its digest; metrics are the
    stage run's; HTML and Markdown reports are copied in. The MLflow reference stays the contract between stages.
    `artifacts` are kfp.dsl artifact objects (uri, path, metadata; log_metric for Metrics), used without importing kfp."""
    missing = sorted(set(spec.kfp_outputs) - set(artifacts))
    if artifacts and missing:
        raise StageError(f"component {spec.name!r} declares no typed outputs {missing}")
    for param, artifact in artifacts.items():
        output, kind = spec.kfp_outputs[param]
        if kind == "metrics":
            source = tracker.client.get_run(result.reused_from or result.run_id)
            for key, value in sorted(source.data.metrics.items()):  # scalars only: the UI plots every key
                artifact.log_metric(key, float(value))
            continue
        ref = result.outputs[output]
        uri = f"{tracker.client.get_run(ref.run_id).info.artifact_uri}/{ref.artifact_path}"
        metadata = {"digest": ref.digest, "mlflow_run_id": ref.run_id, "artifact_path": ref.artifact_path, "kind": ref.kind}
        if kind in ("dataset", "model"):
            artifact.uri = uri
            artifact.metadata.update(metadata)
            continue
        folder = tracker.fetch(ref)
        artifact.metadata.update(metadata | {"mlflow_uri": uri})
        if kind == "html":
            Path(artifact.path).write_text(_self_contained_html(folder))
        else:  # markdown: the report's .md file
            reports = sorted(folder.glob("*.md"))
            Path(artifact.path).write_text(reports[0].read_text() if reports else "")


def _self_contained_html(folder: Path) -> str:
    """The report's HTML page with its charts inlined, so one file shows whole in the Kubeflow UI."""
    import base64

    page = next(iter(sorted(folder.glob("*.html"))), None)
    text = page.read_text() if page else ""
    for image in folder.glob("*.png"):
        data = base64.b64encode(image.read_bytes()).decode()
        text = text.replace(f'src="{image.name}"', f'src="data:image/png;base64,{data}"')
    return text


def rerun_stage_component(name: str, config_yaml: str, from_run: str) -> str:
    """`doctune stage <name> --from-run <id>` inside a pod: a new stage run in that pipeline run, recording
    the one it replaces; returns its refs JSON."""
    config = config_from_yaml(config_yaml)
    tracker = Tracker(config)
    parent, inputs, replaced = resolve_from_run(name, tracker, from_run)
    with stop_on_signals(end_children_first=True):
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


def gate_component(
    config_yaml: str, parent_run_id: str, kfp_outputs: dict | None = None, stage: str = "eval_gate", **upstream: str
) -> tuple[str, str, str, str]:
    """Run a gate (`eval_gate`, or the page track's `page_gate`); returns (refs JSON, decision, version, failed rules
    JSON) for the pipeline's If/Else."""
    from doctune.gate.stage import read_decision

    refs = run_stage_component(stage, config_yaml, parent_run_id, kfp_outputs, **upstream)
    decision = read_decision(refs, Tracker(config_from_yaml(config_yaml)).fetch)
    return refs, decision["decision"], decision["version"], json.dumps(decision["failed"])


def promote_component(config_yaml: str, parent_run_id: str, version: str) -> None:
    from doctune.gate import registry

    tracker = Tracker(config_from_yaml(config_yaml))
    current = registry.champion(tracker)
    if current is None or current[0] != version:  # a rerun of an unchanged pipeline finds it serving already
        registry.promote(tracker, version, reason=f"passed the gate in pipeline run {parent_run_id}")
    tracker.client.set_tag(parent_run_id, f"{TAG}gate.promoted", version)


def reject_component(config_yaml: str, parent_run_id: str, version: str, failed_json: str) -> None:
    from doctune.gate import registry

    tracker = Tracker(config_from_yaml(config_yaml))
    registry.reject(tracker, version, json.loads(failed_json))
    tracker.client.set_tag(parent_run_id, f"{TAG}gate.rejected", version)
