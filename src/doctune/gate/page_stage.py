"""Page gate: the page-extraction candidate, the champion (or the base model before a first promotion) and the base
model each extract the test pages; their replies are parsed as strict JSON and scored per field.

Rules (`page_gate`): JSON validity at least `min_json_validity`, and with `beat_champion` per-page field accuracy above
the champion's by a paired randomization test. A reply that is not valid JSON is asked for once more (sampled) when
`retry_invalid` is on; both attempts are recorded and nothing is repaired. Latency per page (p50/p95) is reported
beside `latency_goal_ms`. The candidate is registered like the text track's (aliased `challenger`, its variants and
decision in tags); the pipeline's promote step moves `champion`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.devices import precision, torch_dtype
from doctune.gate import page_metrics, page_report, registry
from doctune.models import resolve_model
from doctune.page_schema import canonical_json
from doctune.records import GATE_REPORT_FILE, PAGE_INSTRUCTION_FILE, PAGE_SCHEMA_FILE, PAGE_TEST_FILE, read_jsonl
from doctune.tracking import TAG, StageRun
from doctune.train.artifacts import read_meta
from doctune.vision import extract, inference_device, load_model, load_processor, open_image, prompt_inputs

RETRY_TEMPERATURE = 0.7  # a greedy retry would repeat the first reply word for word


class PageGateError(RuntimeError):
    """The page gate cannot score: no test pages, a dataset without its schema."""


def external_digests(config: RunConfig, inputs: dict[str, ArtifactRef]) -> dict[str, str]:
    """The champion is an input too: a gate result is reused only against the same champion."""
    from doctune.tracking import Tracker

    return {"champion": registry.champion_key(Tracker(config), inputs["model"])}


def test_pages(dataset_dir: Path, max_pages: int) -> tuple[list[dict], dict, str]:
    """(test pages, schema, instruction); augmented copies live in the training split only."""
    skipped: list[dict] = []
    pages = [p for p in read_jsonl(dataset_dir / PAGE_TEST_FILE, skipped) if not p.get("augmentation")]
    if max_pages:
        pages = pages[:max_pages]
    if not pages:
        raise PageGateError(
            f"pages dataset {dataset_dir.name} has no test page: the split gave every document to training or validation "
            "(more documents, or a larger share for the test split: 1 - pages.split.train - pages.split.validation)"
        )
    schema = json.loads((dataset_dir / PAGE_SCHEMA_FILE).read_text())
    return pages, schema, (dataset_dir / PAGE_INSTRUCTION_FILE).read_text()


def answerable(pages: list[dict], dataset_dir: Path, schema: dict, instruction: str, folder: Path, max_new: int):
    """(pages every model can be asked, skipped pages with the reason): a page whose reference reply needs more than
    `max_new` tokens could only be answered cut off, and one whose image the processor refuses cannot be asked."""
    processor = load_processor(folder)
    kept, skipped = [], []
    for page in pages:
        reply = len(processor.tokenizer(canonical_json(page["fields"], schema), add_special_tokens=False)["input_ids"]) + 1
        if reply > max_new:
            skipped.append({"id": page["id"], "reason": f"reference reply of {reply} tokens > page_sft.max_output_tokens"})
            continue
        image = open_image(dataset_dir / page["image"])
        try:
            prompt_inputs(processor, image, instruction)
        except Exception as exc:  # e.g. Qwen-VL's resize refuses aspect ratios above 200
            reason = f"the processor cannot take this page image ({image.width}x{image.height}): {type(exc).__name__}: {exc}"
            skipped.append({"id": page["id"], "reason": reason[:300]})
            continue
        kept.append(page)
    return kept, skipped


def score_model(
    folder: Path, dataset_dir: Path, pages: list[dict], schema: dict, instruction: str, config: RunConfig
) -> list[dict]:
    """Every test page extracted by the model in `folder`: the per-page records of `page_metrics.score_page`."""
    import torch

    prec = precision("auto", "inference")
    model = load_model(folder, torch_dtype(prec), device=inference_device()).eval()
    processor = load_processor(folder)
    max_new = config.page_sft.max_output_tokens
    records = []
    for page in pages:
        image = open_image(dataset_dir / page["image"])
        first = extract(model, processor, image, instruction, max_new)
        retried, seconds = None, first.seconds
        if config.page_gate.retry_invalid and page_metrics.parse_reply(first.text)[0] is None:
            torch.manual_seed(0)
            second = extract(model, processor, image, instruction, max_new, temperature=RETRY_TEMPERATURE)
            retried, seconds = second.text, seconds + second.seconds
        records.append(page_metrics.score_page(first.text, page["fields"], schema, seconds, retried, page_id=page["id"]))
    del model
    return records


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    g = config.page_gate
    dataset_dir = tracker.fetch(inputs["pages"])
    pages, schema, instruction = test_pages(dataset_dir, g.max_pages)
    merged = tracker.fetch(inputs["model"])
    pages, skipped = answerable(pages, dataset_dir, schema, instruction, merged, config.page_sft.max_output_tokens)
    if not pages:
        raise PageGateError(f"no test page can be scored: {[item['reason'] for item in skipped][:3]}")
    base_spec = read_meta(merged).get("base_model", config.model.base_model)
    current = registry.champion(tracker.tracker)

    def evaluate(folder: Path) -> list[dict]:
        return score_model(folder, dataset_dir, pages, schema, instruction, config)

    scored = {"candidate": evaluate(merged), "base": evaluate(resolve_model(base_spec, config.project.workdir / "cache"))}
    if current is not None:
        scored["champion"] = evaluate(tracker.fetch(current[1]))
    reference = "champion" if current is not None else "base"
    summaries = {name: page_metrics.summarize(records) for name, records in scored.items()}
    comparison = page_metrics.compare(scored["candidate"], scored[reference], g.permutations)
    rules, failed = page_metrics.decide(summaries["candidate"], comparison, g, reference)
    decision = "reject" if failed else "promote"

    quantize_outputs = tracker.tracker.outputs_of(tracker.client.get_run(inputs["quantized"].run_id))
    variants = {name: ref for name, ref in quantize_outputs.items() if name != "report"}
    parent = tracker.client.get_run(tracker.run_id).data.tags.get("mlflow.parentRunId", "")
    candidate = summaries["candidate"]
    tags = {
        f"{TAG}pipeline_run": parent,
        f"{TAG}gate_run": tracker.run_id,
        f"{TAG}base_model": base_spec,
        registry.GATED_AGAINST_TAG: current[1].digest if current else "none",
        f"{TAG}gate_decision": decision,
        f"{TAG}failed_rules": ", ".join(failed) or "none",
        f"{TAG}datasets": json.dumps({"pages": inputs["pages"].digest}),
        "gate.json_validity": f"{candidate['json_validity']['mean']:.6g}",
        "gate.field_accuracy": f"{candidate['field_accuracy_normalized']['mean']:.6g}",
    }
    version = registry.register_candidate(tracker.tracker, inputs["model"], variants, tags)

    result = {
        "decision": decision,
        "version": version,
        "failed": failed,
        "models": {
            "candidate": f"merged model {inputs['model'].digest[7:19]}",
            "champion": f"version {current[0]} (model {current[1].digest[7:19]})" if current else None,
            "base": base_spec,
        },
        "reference": reference,
        "summaries": summaries,
        "latency_goal_ms": g.latency_goal_ms,
        "rules": rules,
        "comparison": comparison,
        "samples": page_report.pick_samples(scored["candidate"]),
        "pages": {name: records for name, records in scored.items()},
        "skipped": skipped,
    }
    metrics = {f"page_gate.{name}.{key}": float(summary[key]["mean"]) for name, summary in summaries.items()
               for key in ("json_validity", "first_try_validity", "schema_conformance", "field_accuracy_exact",
                           "field_accuracy_normalized")}  # fmt: skip
    metrics |= {f"page_gate.{name}.latency_p95_ms": float(s["latency_ms"]["p95"]) for name, s in summaries.items()}
    metrics |= {"page_gate.promote": float(decision == "promote"), "page_gate.p": float(comparison["p"])}
    tracker.log_metrics(metrics | {"page_gate.skipped_pages": float(len(skipped))})
    tracker.set_tags({f"{TAG}gate.decision": decision, f"{TAG}gate.version": version})
    with tempfile.TemporaryDirectory(prefix="doctune-page-gate-") as tmp:
        out = Path(tmp) / "report"
        page_report.write_report(out, result)
        (out / GATE_REPORT_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str))
        return {"report": tracker.log_output("report", out, kind="gate_report")}
