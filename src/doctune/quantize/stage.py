"""Quantize: deployable variants of the merged model, each loaded and run in the runtime that serves it.

GGUF files (llama.cpp, Ollama) are checked with llama-cpp-python; bitsandbytes NF4 checkpoints by reloading them
with transformers. Every variant, and the merged fp32 model as baseline, gets the same measurements: size on disk,
load time, greedy tokens/s on a chat prompt, perplexity on held-out domain text and its ratio to the merged model.
A variant that cannot be produced is recorded with its error; the others are still made.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from doctune.artifacts import ArtifactRef
from doctune.config import RunConfig
from doctune.cpt.stage import held_out, load_texts, pack
from doctune.merge.stage import SYSTEM_PROMPT_FILE
from doctune.models import BUNDLED_PREFIX, bundled_gguf
from doctune.quantize.gguf_export import GgufExportError, pre_tokenizer_of_gguf, write_gguf
from doctune.tracking import StageRun
from doctune.train.artifacts import read_meta
from doctune.train.stage import train_file

REPORT_FILE = "quantize_report.json"
GGUF_KIND = "gguf_model"
NF4_KIND = "nf4_model"
BASELINE = "merged"


class QuantizeError(RuntimeError):
    """No variant could be produced, or there is no text to measure them on."""


def eval_blocks(config: RunConfig, cpt_dir: Path | None, tokenizer) -> list[list[int]]:
    """Held-out domain text as CPT held it out (same seed and fraction), packed into blocks; all domain text
    when the hold-out is too small to fill one block."""
    if cpt_dir is None:
        raise QuantizeError("quantize needs the CPT dataset (domain text) to measure perplexity; none was handed over")
    records, _ = load_texts(train_file(cpt_dir, "CPT"))
    domain = [r["text"] for r in records if r["source"] == "domain"]
    held = [t for t in domain if held_out(t, config.cpt.seed, config.cpt.eval_fraction)]
    q = config.quantize
    blocks = pack(held, tokenizer, q.block_size)[0] or pack(domain, tokenizer, q.block_size)[0]
    if not blocks:
        raise QuantizeError(f"CPT dataset {cpt_dir}: its domain text makes no block of quantize.block_size {q.block_size}")
    return blocks[: q.eval_blocks]


def perplexity_from_scores(blocks: list[list[int]], score_block) -> float:
    """exp(mean next-token NLL); `score_block(ids)` returns the log-softmax rows (numpy, len(ids) x vocab)."""
    total, count = 0.0, 0
    for ids in blocks:
        logprobs = score_block(ids)
        total -= sum(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    return math.exp(total / count)


def log_softmax(rows):
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))


def chat_messages(model_dir: Path, prompt: str) -> list[dict]:
    system = model_dir / SYSTEM_PROMPT_FILE
    return ([{"role": "system", "content": system.read_text()}] if system.is_file() else []) + [
        {"role": "user", "content": prompt}
    ]


def folder_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- transformers (merged fp32 baseline, NF4) ------------------------------------------


def measure_transformers(folder: Path, config: RunConfig, blocks: list[list[int]], messages: list[dict], **load) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
    load_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(folder)

    @torch.no_grad()
    def score(ids):
        return torch.log_softmax(model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float(), -1).cpu().numpy()

    ppl = perplexity_from_scores(blocks, score)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = {k: v.to(model.device) for k, v in prompt.items()}
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=config.quantize.generate_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    reply = out[0][prompt["input_ids"].shape[1] :]
    return {
        "load_s": load_s,
        "perplexity": ppl,
        "generated_tokens": len(reply),
        "tokens_per_s": len(reply) / seconds,
        "reply": tokenizer.decode(reply, skip_special_tokens=True),
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


# -- llama.cpp (GGUF) -----------------------------------------------------------------


def measure_gguf(path: Path, config: RunConfig, blocks: list[list[int]], messages: list[dict]) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise QuantizeError(
            "checking a GGUF file needs llama-cpp-python (pip install 'doctune[serve]'), which is not installed"
        ) from None

    q = config.quantize
    n_ctx = max(q.block_size, 512)
    started = time.perf_counter()
    llm = Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)
    load_s = time.perf_counter() - started
    try:

        def score(ids):
            llm.reset()
            llm.eval(ids)
            return log_softmax(llm.scores[: len(ids)])

        ppl = perplexity_from_scores(blocks, score)
        llm.reset()
        started = time.perf_counter()
        answer = llm.create_chat_completion(messages, max_tokens=q.generate_tokens, temperature=0.0, top_k=1, seed=0)
        seconds = time.perf_counter() - started
    finally:
        llm.close()
    generated = answer["usage"]["completion_tokens"]
    return {
        "load_s": load_s,
        "perplexity": ppl,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "reply": answer["choices"][0]["message"]["content"],
    }


def gguf_pre_tokenizer(base_spec: str) -> str | None:
    """The llama.cpp pre-tokenizer of a bundled base model (from its own GGUF); None: the architecture's default."""
    if base_spec.startswith(BUNDLED_PREFIX):
        return pre_tokenizer_of_gguf(bundled_gguf(base_spec.removeprefix(BUNDLED_PREFIX)))
    return None


# -- the stage ----------------------------------------------------------------------------


def produce(variant: str, merged: Path, target: Path, base_spec: str) -> dict:
    """Write one variant into `target`; returns what was written."""
    target.mkdir(parents=True)
    if variant == "nf4":
        make_nf4(merged, target)
        return {"format": "bitsandbytes nf4, double quant"}
    type_name = variant.removeprefix("gguf-")
    return write_gguf(merged, target / f"model-{type_name}.gguf", type_name, pre_tokenizer=gguf_pre_tokenizer(base_spec))


def measure(variant: str, folder: Path, config: RunConfig, blocks, messages) -> dict:
    if variant == "nf4":
        import torch

        return measure_transformers(folder, config, blocks, messages, device_map="cuda" if torch.cuda.is_available() else "cpu")
    (path,) = folder.glob("*.gguf")
    return measure_gguf(path, config, blocks, messages)


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    import torch
    from transformers import AutoTokenizer

    merged = tracker.fetch(inputs["model"])
    meta = read_meta(merged)
    base_spec = meta.get("base_model", config.model.base_model)
    blocks = eval_blocks(config, tracker.fetch(inputs["cpt"]) if "cpt" in inputs else None, AutoTokenizer.from_pretrained(merged))
    messages = chat_messages(merged, config.quantize.prompt)
    weights = sum(folder_size(p) for p in merged.glob("*.safetensors"))
    report = {
        "eval_blocks": len(blocks),
        "block_size": len(blocks[0]),
        "prompt": messages,
        BASELINE: {"size_bytes": weights, **measure_transformers(merged, config, blocks, messages, dtype=torch.float32)},
        "variants": {},
        "failed": {},
    }
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="doctune-quantize-") as tmp:
        for variant in config.quantize.variants:
            folder = Path(tmp) / variant
            try:
                written = produce(variant, merged, folder, base_spec)
                result = {"size_bytes": folder_size(folder), **written, **measure(variant, folder, config, blocks, messages)}
            except Exception as error:
                report["failed"][variant] = f"{type(error).__name__}: {error}"
                continue
            result["perplexity_ratio"] = result["perplexity"] / report[BASELINE]["perplexity"]
            result["size_ratio"] = result["size_bytes"] / weights
            result["speedup"] = result["tokens_per_s"] / report[BASELINE]["tokens_per_s"]
            report["variants"][variant] = result
            kind = NF4_KIND if variant == "nf4" else GGUF_KIND
            (folder / REPORT_FILE).write_text(json.dumps(result, indent=1))
            outputs[variant] = tracker.log_output(variant, folder, kind=kind)
        report_dir = Path(tmp) / "report"
        report_dir.mkdir()
        (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
        tracker.log_metrics(report_metrics(report))
        if report["failed"]:
            tracker.set_tags({f"doctune.quantize.failed.{v}": e[:500] for v, e in report["failed"].items()})
        if not outputs:
            raise QuantizeError(f"no quantized variant could be produced: {report['failed']}")
        outputs["report"] = tracker.log_output("report", report_dir, kind="quantize_report")
    return outputs


def report_metrics(report: dict) -> dict[str, float]:
    keys = ("size_bytes", "load_s", "tokens_per_s", "perplexity", "perplexity_ratio", "size_ratio", "speedup")
    rows = {BASELINE: report[BASELINE], **report["variants"]}
    return {f"quantize.{name}.{k}": float(v) for name, row in rows.items() for k, v in row.items() if k in keys}


__all__ = ["GgufExportError", "QuantizeError", "run"]
