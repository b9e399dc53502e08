"""Page quantize: quantized variants of the merged page model, each checked on validation pages against it.

`nf4` (bitsandbytes NF4, double quant) is written and loaded back in transformers; every variant and the merged model
extract the same `page_quantize.check_pages` pages, and the report gives, per variant, how many replies are the merged
model's exactly, how many are valid JSON, the seconds per page and the size. GGUF for a vision-language model needs
the vision projector as its own file (`mmproj`), which llama.cpp's converter writes for the architectures it supports
and doctune's GGUF writer (text models) does not: a gguf-* variant fails with that reason, and the others go on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from doctune.artifacts import NF4_KIND, ArtifactRef
from doctune.config import RunConfig
from doctune.page_schema import parse_reply
from doctune.records import PAGE_INSTRUCTION_FILE, PAGE_SCHEMA_FILE, page_check_records
from doctune.tracking import StageRun
from doctune.vision import extract, inference_device, load_model, load_processor, nf4_config, open_image

REPORT_FILE = "quantize_report.json"
BASELINE = "merged"
CARRIED_FILES = ("generation_config.json", PAGE_SCHEMA_FILE, PAGE_INSTRUCTION_FILE, "doctune_model.json")


class PageQuantizeError(RuntimeError):
    """No quantized variant of the page model could be produced."""


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_nf4(merged: Path, target: Path) -> None:
    model = load_model(merged, quantization_config=nf4_config(), device=inference_device())
    model.save_pretrained(target)
    load_processor(merged).save_pretrained(target)
    for name in CARRIED_FILES:
        if (merged / name).is_file():
            shutil.copy2(merged / name, target / name)


def produce(variant: str, merged: Path, target: Path) -> dict:
    target.mkdir(parents=True)
    if variant == "nf4":
        make_nf4(merged, target)
        return {"format": "bitsandbytes nf4, double quant"}
    architecture = json.loads((merged / "config.json").read_text()).get("architectures", ["?"])[0]
    raise PageQuantizeError(
        f"{variant}: GGUF of the vision-language model {architecture} needs its vision projector written as an mmproj "
        "file by llama.cpp's convert_hf_to_gguf.py (--mmproj), which is not part of doctune's GGUF writer (text models "
        "only); use nf4, or convert the merged model with llama.cpp where it supports this architecture"
    )


def measure(folder: Path, dataset_dir: Path, pages: list[dict], instruction: str, max_new_tokens: int) -> dict:
    started = time.perf_counter()
    model, processor = load_model(folder, device=inference_device()).eval(), load_processor(folder)
    load_s = time.perf_counter() - started
    replies = [extract(model, processor, open_image(dataset_dir / p["image"]), instruction, max_new_tokens) for p in pages]
    return {
        "load_s": load_s,
        "seconds_per_page": sum(r.seconds for r in replies) / len(replies),
        "json_validity": sum(parse_reply(r.text)[0] is not None for r in replies) / len(replies),
        "replies": [r.text for r in replies],
    }


def quantize_variants(config: RunConfig, merged: Path, dataset_dir: Path, root: Path) -> dict:
    pages = page_check_records(dataset_dir, config.page_quantize.check_pages)
    if not pages:
        raise PageQuantizeError(f"pages dataset {dataset_dir.name} has no validation or training page to check variants on")
    instruction = (merged / PAGE_INSTRUCTION_FILE).read_text()
    max_new = config.page_sft.max_output_tokens
    weights = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    baseline = {"size_bytes": weights, **measure(merged, dataset_dir, pages, instruction, max_new)}
    report = {"pages": [p["id"] for p in pages], BASELINE: baseline, "variants": {}, "failed": {}}
    for variant in config.page_quantize.variants:
        folder = root / variant
        try:
            written = produce(variant, merged, folder)
            result = {"size_bytes": folder_size(folder), **written, **measure(folder, dataset_dir, pages, instruction, max_new)}
        except Exception as error:  # one variant failing must not cost the others
            report["failed"][variant] = f"{type(error).__name__}: {error}"
            shutil.rmtree(folder, ignore_errors=True)
            continue
        same = sum(a == b for a, b in zip(result["replies"], baseline["replies"], strict=True))
        result |= {"same_reply_share": same / len(pages), "size_ratio": result["size_bytes"] / weights}
        report["variants"][variant] = result
    return report


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    merged = tracker.fetch(inputs["model"])
    dataset_dir = tracker.fetch(inputs["pages"])
    with tempfile.TemporaryDirectory(prefix="doctune-page-quantize-") as tmp:
        report = quantize_variants(config, merged, dataset_dir, Path(tmp))
        tracker.log_metrics(report_metrics(report))
        if report["failed"]:
            tracker.set_tags({f"doctune.page_quantize.failed.{v}": e[:500] for v, e in report["failed"].items()})
        if not report["variants"]:
            raise PageQuantizeError(f"no quantized variant could be produced: {report['failed']}")
        outputs = {variant: tracker.log_output(variant, Path(tmp) / variant, kind=NF4_KIND) for variant in report["variants"]}
        report_dir = Path(tmp) / "report"
        report_dir.mkdir()
        (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False))
        outputs["report"] = tracker.log_output("report", report_dir, kind="quantize_report")
    return outputs


def report_metrics(report: dict) -> dict[str, float]:
    keys = ("size_bytes", "load_s", "seconds_per_page", "json_validity", "same_reply_share", "size_ratio")
    rows = {BASELINE: report[BASELINE], **report["variants"]}
    return {f"page_quantize.{name}.{k}": float(v) for name, row in rows.items() for k, v in row.items() if k in keys}
