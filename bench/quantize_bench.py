"""Quantization benchmark: every variant of the bundled SmolLM2-135M-Instruct against the fp32 model, in one run.

The fp32 model stands where the merged model stands in the pipeline (a merge yields the same architecture and
size). Held-out text is the CPT hold-out of the synthetic CPT dataset of the corpus (ingest and synth run first,
or are reused from .doctune). Each GGUF variant runs in llama.cpp (llama-cpp-python), NF4 and fp32 in
transformers; tokens/s is greedy generation on CPU. The K-quants are weighted by an importance matrix of the CPT
domain text, as the quantize stage makes them; q4_k_m is also made without one, to show what it buys. Writes
bench/results/quantize.json and quantize.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from results_io import write_results
from train_bench import datasets

from doctune.config import load_config
from doctune.models import resolve_model
from doctune.quantize.stage import BASELINE, domain_texts, heldout_blocks, make_variant, quantize_variants

REPO = Path(__file__).resolve().parents[1]
PLAIN_K_QUANT = "gguf-q4_k_m, no imatrix"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--variants", default="[gguf-f16, gguf-q8_0, gguf-q4_k_m, gguf-q4_0, nf4]")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = load_config(
        REPO / "configs" / "cpu-demo.yaml",
        [f"project.workdir={REPO / '.doctune'}", f"ingest.pdfs={args.pdfs}", f"quantize.variants={args.variants}",
         "quantize.generate_tokens=64"],
    )  # fmt: skip
    tracker, outputs = datasets(config)
    from transformers import AutoTokenizer

    model_dir = resolve_model(config.model.base_model, config.project.workdir / "cache")
    q = config.quantize
    blocks = heldout_blocks(
        tracker.fetch(outputs["heldout"]), AutoTokenizer.from_pretrained(model_dir), q.block_size, q.eval_blocks
    )
    domain = domain_texts(tracker.fetch(outputs["cpt"]))
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        report = quantize_variants(config, model_dir, config.model.base_model, blocks, Path(tmp), domain)
        if "gguf-q4_k_m" in report["variants"]:  # the same K-quant without the domain importance matrix
            report["variants"][PLAIN_K_QUANT] = make_variant(
                "gguf-q4_k_m", Path(tmp) / "q4_k_m-plain", model_dir, config.model.base_model, None, config, blocks,
                report["prompt"], report[BASELINE],
            )  # fmt: skip
    for row in [report[BASELINE], *report["variants"].values()]:
        row.pop("reply", None)
    targets = {"gguf-q8_0 perplexity_ratio": "<= 1.02", "gguf-q4_k_m perplexity_ratio": "<= 1.05",
               "gguf-q4_k_m perplexity vs q4_0 and vs q4_k_m without imatrix": "< 1"}  # fmt: skip
    report |= {"model": config.model.base_model, "cpus": os.cpu_count(), "targets": targets}
    base = report[BASELINE]
    lines = [
        f"Quantization benchmark: bundled SmolLM2-135M-Instruct, {report['eval_blocks']} held-out blocks of "
        f"{report['block_size']} tokens, greedy generation of up to {config.quantize.generate_tokens} tokens, "
        f"{os.cpu_count()} CPUs.",
        "",
        "| variant | runtime | MiB | size ratio | load s | tokens/s | speed ratio | perplexity | ppl ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 (merged) | transformers | {base['size_bytes'] / 2**20:.1f} | 1.00 | {base['load_s']:.2f} | "
        f"{base['tokens_per_s']:.1f} | 1.00 | {base['perplexity']:.3f} | 1.000 |",
        *(
            f"| {name} | {'transformers' if name == 'nf4' else 'llama.cpp'} | {r['size_bytes'] / 2**20:.1f} | "
            f"{r['size_ratio']:.2f} | {r['load_s']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
            f"{r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} |"
            for name, r in report["variants"].items()
        ),
        *(f"| {name} | failed: {error} | | | | | | | |" for name, error in report["failed"].items()),
        "",
        "Targets: gguf-q8_0 perplexity ratio <= 1.02 (the gate's default for quantized variants); gguf-q4_k_m (with"
        " the domain importance matrix) <= 1.05, and below q4_0 and q4_k_m without the matrix.",
    ]
    write_results(args.out, "quantize", report, lines)


if __name__ == "__main__":
    main()
