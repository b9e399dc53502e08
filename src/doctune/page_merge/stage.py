"""Page merge: the page model's adapter folded into full-precision weights, checked on real page images.

The merged vision-language model must give the adapter model's logits, within `merge.max_logit_diff`, on validation
pages (the image, the instruction and the page's JSON reply): the image path is part of the check, so a trained
projector (`page_sft.lora.train_projector`) is checked too. Nothing is saved when they differ.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from doctune.artifacts import MODEL_KIND, ArtifactRef
from doctune.config import RunConfig
from doctune.devices import precision, torch_dtype
from doctune.page_schema import canonical_json
from doctune.records import PAGE_INSTRUCTION_FILE, PAGE_SCHEMA_FILE, page_check_records
from doctune.tracking import StageRun
from doctune.train.artifacts import (
    MERGE_TOLERANCE,
    base_folder_of,
    end_of_turn_generation_config,
    lineage,
    materialize,
    merge_adapter,
    read_meta,
    write_meta,
)
from doctune.vision import load_processor, open_image, page_messages

CARD_FILE = "README.md"
PROBE_PAGES = 2
CARRIED_FILES = (PAGE_SCHEMA_FILE, PAGE_INSTRUCTION_FILE)


class PageMergeError(RuntimeError):
    """The merged page model does not behave like the adapter model it came from."""


def probe_inputs(processor, dataset_dir: Path, records: list[dict], schema: dict, instruction: str) -> list:
    probes = []
    for record in records:
        text = processor.apply_chat_template(page_messages(instruction, canonical_json(record["fields"], schema)), tokenize=False)
        image = open_image(dataset_dir / record["image"])
        probes.append(processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False))
    return probes


def model_card(base_spec: str, chain: list[dict], check: dict) -> str:
    lines = [
        "---", "library_name: transformers", f"base_model: {base_spec}", "pipeline_tag: image-text-to-text",
        "tags: [doctune, page-extraction, merged]", "---", "",
        "# doctune page-extraction model", "",
        f"Base model: `{base_spec}`, fine-tuned to answer a rendered PDF page and the instruction in "
        f"`{PAGE_INSTRUCTION_FILE}` with JSON following `{PAGE_SCHEMA_FILE}`. Built by: "
        + ", ".join(f"{link['stage']} ({link.get('method', '-')}, run `{link.get('stage_run', '-')}`)" for link in chain) + ".",
    ]  # fmt: skip
    if check.get("adapter"):
        lines += [
            "", "## Merge check", "",
            f"Adapter model vs merged model on {check['probe_pages']} pages ({check['probe_tokens']} positions, image "
            f"tokens included): largest logit gap {check['max_logit_diff']:.3g} (allowed {check['tolerance']:.3g}), "
            f"precision {check['precision']}.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def merge_page_model(config: RunConfig, model_input: ArtifactRef, dataset_dir: Path, fetch, target: Path) -> dict:
    folder = fetch(model_input)
    meta = read_meta(folder)
    if meta["format"] == "full":
        for path in materialize(model_input, config, fetch).iterdir():
            if path.is_file():
                shutil.copy2(path, target / path.name)
        return {"precision": "as trained", "adapter": False}
    prec = precision(config.merge.precision, "merge")
    processor = load_processor(folder)
    schema = json.loads((folder / PAGE_SCHEMA_FILE).read_text())
    records = page_check_records(dataset_dir, PROBE_PAGES)
    if not records:
        raise PageMergeError(f"pages dataset {dataset_dir.name} has no page to check the merge on")
    probes = probe_inputs(processor, dataset_dir, records, schema, (folder / PAGE_INSTRUCTION_FILE).read_text())
    check = merge_adapter(base_folder_of(meta, config, fetch), folder, target, dtype=torch_dtype(prec), probes=probes)
    tolerance = config.merge.max_logit_diff or MERGE_TOLERANCE[prec]
    check |= {"precision": prec, "tolerance": tolerance, "adapter": True, "probe_pages": len(records)}
    if check["max_logit_diff"] > tolerance:
        raise PageMergeError(
            f"merged page model differs from the adapter model {model_input.run_id}/{model_input.artifact_path}: largest "
            f"logit gap {check['max_logit_diff']:.4g} > merge.max_logit_diff {tolerance:.4g} ({prec}); nothing was saved"
        )
    return check


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    model_input = inputs["model"]
    folder = tracker.fetch(model_input)
    dataset_dir = tracker.fetch(inputs["pages"])
    base_spec, chain = lineage(model_input, tracker.fetch)
    with tempfile.TemporaryDirectory(prefix="doctune-page-merge-") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        check = merge_page_model(config, model_input, dataset_dir, tracker.fetch, out)
        for name in CARRIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
        end_of_turn_generation_config(out, load_processor(out).tokenizer)
        (out / CARD_FILE).write_text(model_card(base_spec, chain, check))
        write_meta(
            out, fmt="full", stage="page_merge", method=read_meta(folder)["method"], base={"ref": model_input.to_dict()},
            extra={"base_model": base_spec, "lineage": chain, "merge_check": check, "task": "page_extraction"},
        )  # fmt: skip
        tracker.log_metrics({f"merge.{k}": v for k, v in check.items() if isinstance(v, float)})
        tracker.log_text(json.dumps(check, indent=1), "merge_check.json")
        return {"model": tracker.log_output("model", out, kind=MODEL_KIND)}
