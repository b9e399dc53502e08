"""GPU training benchmark: LoRA and full fine-tuning tokens/s and model FLOPs utilisation (MFU) of a 1B-class
Llama built from its config (Llama-3.2-1B's shapes, random weights) in bf16, on one CUDA GPU.

Each method trains as doctune's SFT does on a GPU: weights in bf16, LoRA r=16 on every linear layer of the blocks
(adapter in fp32 under bf16 autocast; dropout 0.05, doctune's default, and 0, since dropout copies every adapter
input) or every weight with fused AdamW; SDPA attention, no gradient
checkpointing, full rows of random tokens (packed rows have no padding either). The loop is plain PyTorch, so it
measures the model's step, not a trainer's bookkeeping.

Model FLOPs per token are counted from the shapes (matrix products only, PaLM's convention): forward
2 x (block weights + LM head) + 4 x layers x sequence x hidden for attention scores and values; a full step is
3x the forward (weight and input gradients), a LoRA step 2x (input gradients only: the base is frozen).
MFU is achieved model FLOP/s over the GPU's dense bf16 peak. Without CUDA it exits with a message and writes
nothing. Writes bench/results/gpu_train.json and gpu_train.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak, FLOP/s, by the name torch reports (datasheet figures, no sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0,
)  # fmt: skip


def forward_flops_per_token(config, seq_len: int) -> float:
    """Matrix-product FLOPs of one token's forward pass through a Llama-shaped model at `seq_len`."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_block = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o; k, v; gate, up, down
    weights = layers * per_block + d * config.vocab_size  # the LM head
    return 2 * weights + 4 * layers * seq_len * d


def peak_flops(device_name: str, override: float | None) -> float:
    if override:
        return override * 1e12
    for name, peak in PEAK_BF16.items():
        if name in device_name:
            return peak
    raise SystemExit(f"no known bf16 peak for {device_name!r}: give --peak-tflops")


def measure(method: str, config, batch: int, seq_len: int, steps: int, warmup: int, lora_dropout: float = 0.05) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU (no fp32 copy on the host)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # PEFT's "all-linear", doctune's default: every linear layer of the blocks, not the LM head.
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules="all-linear")
        model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device="cuda")
    model.train()

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = batch * seq_len / seconds
    flops_per_token = forward_flops_per_token(config, seq_len) * (3 if method == "full" else 2)
    result = {
        "method": method if method == "full" else f"lora (dropout {lora_dropout:g})",
        "batch": batch, "seq_len": seq_len, "steps": steps, "step_seconds": round(seconds, 4),
        "tokens_per_s": round(tokens_per_s), "model_tflops_per_s": round(tokens_per_s * flops_per_token / 1e12, 1),
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "loss_first_last": [losses[0], losses[-1]],
    }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_train_bench: no CUDA device here; it runs on a GPU machine (results kept from the last GPU run)")
        return
    import transformers
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_io import write_results

    config = LlamaConfig(**LLAMA_1B, attn_implementation="sdpa")
    device = torch.cuda.get_device_name()
    peak = peak_flops(device, args.peak_tflops)
    runs = []
    for method, dropout in (("lora", 0.05), ("lora", 0.0), ("full", 0.0)):
        run = measure(method, config, args.batch, args.seq_len, args.steps, args.warmup, dropout)
        run["mfu"] = round(run["model_tflops_per_s"] * 1e12 / peak, 3)
        runs.append(run)
        torch.cuda.empty_cache()  # the first model is garbage once measure() returns
    result = {
        "device": device, "peak_bf16_tflops": peak / 1e12, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": LLAMA_1B, "runs": runs,
        "forward_flops_per_token": forward_flops_per_token(config, args.seq_len),
    }  # fmt: skip
    lines = [
        f"GPU training benchmark: {device}, Llama 1B-class from config ({runs[0]['params'] / 1e9:.2f}B parameters), "
        f"bf16, batch {args.batch} x {args.seq_len} tokens, mean of {args.steps} steps after {args.warmup}.",
        "",
        "| method | trainable | step s | tokens/s | model TFLOP/s | MFU | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['method']} | {r['trainable'] / 1e6:.1f}M | {r['step_seconds']} | {r['tokens_per_s']} | "
                     f"{r['model_tflops_per_s']} | {r['mfu']:.1%} | {r['peak_memory_gib']} |")  # fmt: skip
    write_results(args.out, "gpu_train", result, lines)


if __name__ == "__main__":
    main()
