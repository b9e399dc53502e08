"""One benchmark report from the results the benchmarks wrote: each ratio measured within one run, its target,
and whether it meets it. Writes bench/results/summary.json and summary.md (the README's benchmark table)."""

from __future__ import annotations

import json
from pathlib import Path

from results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def rows() -> list[dict]:
    out = []

    def add(what: str, value: float | None, target: str, meets: bool | None, source: str) -> None:
        out.append({"benchmark": what, "ratio": value, "target": target, "meets": meets, "source": source})

    if ingest := load("ingest"):
        r = ingest["ratios"]
        add("ingest (1 process) vs bare pymupdf extraction, pages/s", r["ingest_1proc_vs_bare"], ">= 0.5",
            r["ingest_1proc_vs_bare"] >= 0.5, "ingest_bench.py")  # fmt: skip
        add("ingest speed-up, 1 → 2 processes", r["speedup_1_to_2_procs"], ">= 1.7", r["speedup_1_to_2_procs"] >= 1.7,
            "ingest_bench.py")  # fmt: skip
    if train := load("train"):
        ratio = train["packed_over_unpacked"]
        add("SFT packed vs unpacked, real tokens/s", ratio, ">= 2", ratio >= 2, "train_bench.py")
    if synth := load("synth"):
        growth = synth["dedup_growth"]
        add("dedup time growth, 10k → 100k questions (linear = 10)", growth, "<= 12", growth <= 12, "synth_bench.py")
    if quantize := load("quantize"):
        q8 = quantize["variants"].get("gguf-q8_0")
        if q8:
            ratio = round(q8["tokens_per_s"] / quantize["merged"]["tokens_per_s"], 2)
            add("GGUF q8_0 (llama.cpp) vs merged fp32 (transformers), generation tokens/s", ratio, "> 1", ratio > 1,
                "quantize_bench.py")  # fmt: skip
            add("GGUF q8_0 perplexity vs merged fp32", round(q8["perplexity_ratio"], 3), "<= 1.02",
                q8["perplexity_ratio"] <= 1.02, "quantize_bench.py")  # fmt: skip
    if gpu := load("gpu_train"):
        runs = {r["method"]: r for r in gpu["runs"]}
        lora, full, where = runs["lora (dropout 0.05)"], runs["full"], f"{gpu['device']}, 1B-class, bf16"
        add(f"LoRA vs full SFT tokens/s ({where})", round(lora["tokens_per_s"] / full["tokens_per_s"], 2), "", None,
            "gpu_train_bench.py")  # fmt: skip
        for run in (lora, full):
            add(f"{run['method']} SFT model FLOPs utilisation ({where}; {run['tokens_per_s']} tokens/s)", run["mfu"], "",
                None, "gpu_train_bench.py")  # fmt: skip
    if pipeline := load("pipeline"):
        for name, label in (("tiny", "tiny profile"), ("default_last_run", "default profile, last full run")):
            if row := pipeline.get(name):
                add(f"orchestration overhead of the local pipeline ({label}), share of wall time",
                    row["overhead_share"], "< 0.10", row["overhead_share"] < 0.10, "pipeline_bench.py")  # fmt: skip
    return out


def main() -> None:
    table = rows()
    lines = ["| benchmark | measured | target | meets |", "|---|---|---|---|"]
    meets = {True: "yes", False: "no", None: ""}  # no target: a measurement to report
    lines += [f"| {r['benchmark']} | {r['ratio']} | {r['target']} | {meets[r['meets']]} |" for r in table]
    write_results(RESULTS, "summary", {"rows": table}, lines)


if __name__ == "__main__":
    main()
