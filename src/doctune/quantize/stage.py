"""Quantize: deployable variants of the merged model, each loaded and run in the runtime that serves it.

GGUF files (llama.cpp, Ollama) are written by doctune's GGUF writer, or for the K-quants (q4_k_m, q5_k_m, q6_k, ...)
by llama.cpp's own quantizer from an f16 file with an importance matrix of the domain's CPT text, and checked with
llama-cpp-python; bitsandbytes NF4 checkpoints by reloading them with transformers. Every variant, and the merged
fp32 model as baseline, gets the same measurements: size on disk, load time, greedy tokens/s on a chat prompt,
perplexity on held-out domain text and its ratio to the merged model.
A variant that cannot be produced is recorded with its error; the others are still made.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from doctune.artifacts import GGUF_KIND, NF4_KIND, ArtifactRef
from doctune.chat import conversation
from doctune.config import RunConfig
from doctune.devices import usable_cpus
from doctune.models import BUNDLED_PREFIX, bundled_gguf
from doctune.quantize.gguf_export import (
    GgufExportError,
    llama_cpp_file_type,
    pre_tokenizer_of_gguf,
    requantize,
    writable_name,
    write_gguf,
)
from doctune.quantize.importance import ImportanceMatrix, importance_matrix
from doctune.records import HELDOUT_FILE, QUANTIZE_REPORT_FILE, SYSTEM_PROMPT_FILE, TRAIN_FILE, read_text_file, text_records
from doctune.runtimes import open_runtime
from doctune.textblocks import perplexity_blocks
from doctune.tracking import StageRun
from doctune.train.artifacts import read_meta

REPORT_FILE = QUANTIZE_REPORT_FILE
BASELINE = "merged"


class QuantizeError(RuntimeError):
    """No variant could be produced, or there is no text to measure them on."""


def heldout_blocks(heldout_dir: Path, tokenizer, block_size: int, count: int) -> list[list[int]]:
    """Blocks of the held-out domain text synth wrote (no training stage saw it)."""
    texts = [r["text"] for r in text_records(heldout_dir / HELDOUT_FILE, [])]
    blocks = perplexity_blocks(texts, tokenizer, block_size, count)
    if not blocks:
        raise QuantizeError(
            f"the held-out domain text ({heldout_dir / HELDOUT_FILE}) is empty: synth holds out text only when the corpus "
            "gives two or more domain texts and synth.heldout_fraction > 0"
        )
    return blocks


def domain_texts(cpt_dir: Path) -> list[str]:
    """The domain text of synth's CPT dataset (its replayed general text left out): what the importance matrix
    is computed on. Not the held-out text, which the variants are scored on."""
    return [r["text"] for r in text_records(cpt_dir / TRAIN_FILE, []) if r["source"] == "domain"]


def folder_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(folder: Path, config: RunConfig, blocks: list[list[int]], messages: list[dict]) -> dict:
    """Load time, perplexity and greedy tokens/s of a model folder in its runtime (llama.cpp for GGUF)."""
    runtime = open_runtime(folder, n_ctx=max(config.quantize.block_size, 512), batch_size=1)
    try:
        ppl = runtime.perplexity(blocks)
        (reply,) = runtime.chat([messages], config.quantize.generate_tokens)
    finally:
        runtime.close()
    return {
        "load_s": runtime.load_s,
        "perplexity": ppl,
        "generated_tokens": reply.tokens,
        "tokens_per_s": reply.tokens / reply.seconds,
        "reply": reply.text,
    }


def make_nf4(merged: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=quantization, device_map=device)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(merged).save_pretrained(target)
    for name in ("generation_config.json", SYSTEM_PROMPT_FILE):
        if (merged / name).is_file():
            shutil.copy2(merged / name, target / name)


def gguf_pre_tokenizer(base_spec: str) -> str | None:
    """The llama.cpp pre-tokenizer of a bundled base model (from its own GGUF); None: the architecture's default."""
    if base_spec.startswith(BUNDLED_PREFIX):
        return pre_tokenizer_of_gguf(bundled_gguf(base_spec.removeprefix(BUNDLED_PREFIX)))
    return None


# -- the stage ----------------------------------------------------------------------------


def needs_quantizer(variant: str) -> bool:
    """Whether a variant is made by llama.cpp's quantizer (the K-quants), not written by doctune's GGUF writer."""
    type_name = variant.removeprefix("gguf-")
    return variant != "nf4" and not writable_name(type_name) and llama_cpp_file_type(type_name) is not None


def produce(variant: str, merged: Path, target: Path, base_spec: str, imatrix: ImportanceMatrix | None = None) -> dict:
    """Write one variant into `target`; returns what was written."""
    target.mkdir(parents=True)
    if variant == "nf4":
        make_nf4(merged, target)
        return {"format": "bitsandbytes nf4, double quant"}
    type_name = variant.removeprefix("gguf-")
    pre_tokenizer = gguf_pre_tokenizer(base_spec)
    if not needs_quantizer(variant):
        return write_gguf(merged, target / f"model-{type_name}.gguf", type_name, pre_tokenizer=pre_tokenizer)
    # K-quants and the like: llama.cpp's own quantizer, from an f16 file that does not stay in the variant.
    with tempfile.TemporaryDirectory(prefix="doctune-f16-") as scratch:
        f16 = Path(scratch) / "model-f16.gguf"
        written = write_gguf(merged, f16, "f16", pre_tokenizer=pre_tokenizer)
        values = imatrix.values if imatrix is not None else None
        done = requantize(f16, target / f"model-{type_name}.gguf", type_name, usable_cpus(), imatrix=values)
    return {**written, **done}


def quantize_variants(
    config: RunConfig, merged: Path, base_spec: str, blocks: list[list[int]], root: Path, domain: list[str] | None = None
) -> dict:
    """Produce and measure every configured variant into root/<variant>; returns the report (failures included).
    The K-quants are weighted by an importance matrix of the `domain` text where there is one."""
    q = config.quantize
    messages = conversation(q.prompt, read_text_file(merged, SYSTEM_PROMPT_FILE))
    weights = sum(folder_size(p) for p in merged.glob("*.safetensors"))
    baseline = {"size_bytes": weights, **measure(merged, config, blocks, messages)}
    report = {"eval_blocks": len(blocks), "block_size": len(blocks[0]), "prompt": messages, BASELINE: baseline}
    report |= {"variants": {}, "failed": {}}
    imatrix = None
    if any(needs_quantizer(v) for v in q.variants):
        if not q.imatrix_blocks:
            report["importance_matrix"] = {"skipped": "quantize.imatrix_blocks is 0"}
        elif not domain:
            report["importance_matrix"] = {"skipped": "no CPT domain text among the stage's inputs"}
        else:
            try:
                imatrix = importance_matrix(merged, domain, q.block_size, q.imatrix_blocks)
                report["importance_matrix"] = {"text": "synth's CPT domain text", **imatrix.summary()}
            except Exception as error:  # the variants are still made, unweighted, and the report says why
                report["importance_matrix"] = {"failed": f"{type(error).__name__}: {error}"}
    for variant in q.variants:
        folder = root / variant
        try:
            made = make_variant(variant, folder, merged, base_spec, imatrix, config, blocks, messages, baseline)
            report["variants"][variant] = made
        except Exception as error:  # one variant failing must not cost the others
            report["failed"][variant] = f"{type(error).__name__}: {error}"
            shutil.rmtree(folder, ignore_errors=True)
    return report


def make_variant(
    variant: str, folder: Path, merged: Path, base_spec: str, imatrix: ImportanceMatrix | None, config: RunConfig,
    blocks: list[list[int]], messages: list[dict], baseline: dict,
) -> dict:  # fmt: skip
    """One variant produced into `folder` and measured as the merged `baseline` was."""
    written = produce(variant, merged, folder, base_spec, imatrix)
    result = {"size_bytes": folder_size(folder), **written, **measure(folder, config, blocks, messages)}
    result["perplexity_ratio"] = result["perplexity"] / baseline["perplexity"]
    result["size_ratio"] = result["size_bytes"] / baseline["size_bytes"]
    result["speedup"] = result["tokens_per_s"] / baseline["tokens_per_s"]
    (folder / REPORT_FILE).write_text(json.dumps(result, indent=1))
    return result


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    from transformers import AutoTokenizer

    merged = tracker.fetch(inputs["model"])
    base_spec = read_meta(merged).get("base_model", config.model.base_model)
    q = config.quantize
    blocks = heldout_blocks(tracker.fetch(inputs["heldout"]), AutoTokenizer.from_pretrained(merged), q.block_size, q.eval_blocks)
    domain = domain_texts(tracker.fetch(inputs["cpt"])) if "cpt" in inputs else None
    with tempfile.TemporaryDirectory(prefix="doctune-quantize-") as tmp:
        report = quantize_variants(config, merged, base_spec, blocks, Path(tmp), domain)
        tracker.log_metrics(report_metrics(report))
        if report["failed"]:
            tracker.set_tags({f"doctune.quantize.failed.{v}": e[:500] for v, e in report["failed"].items()})
        if not report["variants"]:
            raise QuantizeError(f"no quantized variant could be produced: {report['failed']}")
        outputs = {
            variant: tracker.log_output(variant, Path(tmp) / variant, kind=NF4_KIND if variant == "nf4" else GGUF_KIND)
            for variant in report["variants"]
        }
        report_dir = Path(tmp) / "report"
        report_dir.mkdir()
        (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
        outputs["report"] = tracker.log_output("report", report_dir, kind="quantize_report")
    return outputs


def report_metrics(report: dict) -> dict[str, float]:
    keys = ("size_bytes", "load_s", "tokens_per_s", "perplexity", "perplexity_ratio", "size_ratio", "speedup")
    rows = {BASELINE: report[BASELINE], **report["variants"]}
    return {f"quantize.{name}.{k}": float(v) for name, row in rows.items() for k, v in row.items() if k in keys}


__all__ = ["GgufExportError", "QuantizeError", "run"]
