"""VLM training benchmark: page SFT tokens/s and peak GPU memory of a Qwen3-VL-8B-shaped model (built from its
config, random weights) with LoRA in bf16 and with QLoRA (NF4), with and without gradient checkpointing, on one
CUDA GPU, against the guide's memory expectations for an 8B model (LoRA bf16 24-48 GB, QLoRA 16-24 GB).

The shapes are Qwen/Qwen3-VL-8B-Instruct's config.json (as published with the model, transformers 4.57): text
hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128, intermediate 12288, vocab 151936, rope theta 5e6 with
interleaved M-RoPE sections [24, 20, 20], untied LM head; vision depth 27, hidden 1152, intermediate 4304, 16 heads,
patch 16, spatial merge 2, temporal patch 2, 2304 position embeddings, out_hidden 4096, DeepStack layers 8, 16, 24;
image/video/vision start/end tokens 151655/151656/151652/151653. `--shape tiny` is a two-layer model of the same
family (text hidden 128: bitsandbytes quantizes on CPU only widths in multiples of 128) for the CPU check.

Each method adapts what doctune's page SFT adapts (`doctune.train.core.load_vision_model`): LoRA r 16, alpha 32,
dropout 0.05 on the language model's q/k/v/o projections (`doctune.vision.language_lora_targets`), the vision encoder
frozen. lora: weights in bf16, the adapter in fp32 (PEFT's default) under bf16 autocast, AdamW. qlora: the language
model in NF4 with `doctune.vision.nf4_config(bf16)` (quantized by transformers' loader from the random bf16 weights),
`prepare_model_for_kbit_training` (which keeps the vision encoder, embeddings and LM head in fp32), bf16 autocast,
paged 8-bit AdamW on a GPU (the trainer's optimizer there). Gradient checkpointing as the trainer enables it
(non-reentrant, every layer). Batch 1 per step (the guide reaches its effective batch by accumulation).

Each step is one page: a square image of at most `--pixels` pixels (default doctune's `pages.render.max_pixels`,
1003520: 992 x 992, a 62 x 62 patch grid, 961 image tokens after the 2 x 2 merge) fed as the Qwen-VL processor
would (pixel_values of [grid_t*grid_h*grid_w, 3*temporal_patch*patch*patch], image_grid_thw, mm_token_type_ids),
`--text-tokens` of chat and instruction text around it and `--reply-tokens` of reply (the guide's max output
tokens, 512), random token ids; the loss covers the reply tokens only. tokens/s counts every token of the sequence,
image tokens included; reply tokens/s counts the reply. Peak memory is `torch.cuda.max_memory_allocated` over the
measured steps (the model, optimizer state and activations; reset per run, each run builds its own model and frees
it). Without CUDA it exits with a message and writes nothing, unless given `--device cpu --shape tiny` (the code
path on CPU: no memory figure). Writes bench/results/vlm_train.json and vlm_train.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The guide's GPU memory for fine-tuning an 8B vision-language model, GB.
GUIDE_GB = {"lora": (24, 48), "qlora": (16, 24)}
QWEN3_VL_8B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
        attention_bias=False,
        rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True),
    ),
    vision_config=dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, out_hidden_size=4096,
        hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[8, 16, 24],
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    text_config=dict(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[12, 10, 10], mrope_interleaved=True),
    ),
    vision_config=dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=256, out_hidden_size=128, deepstack_visual_indexes=[0],
    ),
    image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293, tie_word_embeddings=False,
)  # fmt: skip
# name -> (config, how many token ids below the special ones random text draws from)
SHAPES = {"qwen3-vl-8b": (QWEN3_VL_8B, 151643), "tiny": (TINY, 290)}


def page_grid(pixels: int, patch: int, merge: int) -> tuple[int, int]:
    """(side in pixels, patches per side) of the largest square page within `pixels` whose side the Qwen-VL image
    processor keeps (a multiple of patch x merge)."""
    factor = patch * merge
    side = max(factor, math.isqrt(pixels) // factor * factor)
    return side, side // patch


def page_inputs(config, ordinary: int, pixels: int, text_tokens: int, reply_tokens: int, device: str) -> dict:
    """One training sequence as the processor and the collator would give it: chat text, the page's image tokens
    between vision start/end, more text, then the reply, the only labeled tokens. mm_token_type_ids (1 on image
    tokens) only where this transformers' Qwen3-VL takes them (older versions find the image by its token id)."""
    import inspect

    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    vision = config.vision_config
    side, grid = page_grid(pixels, vision.patch_size, vision.spatial_merge_size)
    image_tokens = grid * grid // vision.spatial_merge_size**2
    generator = torch.Generator().manual_seed(0)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, ordinary, (n,), generator=generator)

    before = min(3, text_tokens - 2)  # "<|im_start|>user\n"; after the image the instruction, the assistant header
    ids = torch.cat([
        text(before), torch.tensor([config.vision_start_token_id]), torch.full((image_tokens,), config.image_token_id),
        torch.tensor([config.vision_end_token_id]), text(text_tokens - 2 - before), text(reply_tokens),
    ]).unsqueeze(0)  # fmt: skip
    labels = torch.full_like(ids, -100)
    labels[:, -reply_tokens:] = ids[:, -reply_tokens:]
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "pixel_values": torch.randn(grid * grid, width, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid, grid]]),
    }  # fmt: skip
    if "mm_token_type_ids" in inspect.signature(Qwen3VLModel.forward).parameters:
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int()
    page = {"side_pixels": side, "grid": [1, grid, grid], "patches": grid * grid, "image_tokens": image_tokens,
            "text_tokens": text_tokens, "reply_tokens": reply_tokens, "seq_len": ids.shape[1]}  # fmt: skip
    return {"inputs": {k: v.to(device) for k, v in inputs.items()}, "page": page}


def parameter_counts(config) -> dict:
    """Parameters of the unquantized model, counted on the meta device: language model (embeddings and LM head
    included) and vision encoder (its merger included)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "language_model": total - vision, "vision_encoder": vision}


def build(config, method: str, checkpointing: bool, device: str):
    """The PEFT model as doctune's page SFT prepares it (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Qwen3VLForConditionalGeneration

    from doctune import vision

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random weights made in bf16 on the device
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    if method == "qlora":  # transformers' loader quantizes the language model as it loads the bf16 weights
        state = model.state_dict()
        del model
        where = torch.device(device)
        place = (where.index if where.index is not None else torch.cuda.current_device()) if where.type == "cuda" else device
        model, info = Qwen3VLForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state, dtype=torch.bfloat16, device_map={"": place},
            quantization_config=vision.nf4_config(torch.bfloat16), output_loading_info=True,
        )  # fmt: skip
        del state
        free()
        if info.get("missing_keys") or info.get("unexpected_keys"):
            raise RuntimeError(f"the NF4 model did not take every weight: {info}")
        if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
            raise RuntimeError("nothing was quantized to NF4")
    if checkpointing:
        model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if checkpointing:  # as the trainer enables it: non-reentrant, inputs requiring grad
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    targets = vision.language_lora_targets(model, ATTENTION, include_mlp=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, lora)


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(config, method: str, checkpointing: bool, batch: dict, steps: int, warmup: int, device: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    model = build(config, method, checkpointing, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == "qlora" and cuda:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=2e-4)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=cuda)
    inputs = batch["inputs"]
    model.train()

    def step() -> float:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    page = batch["page"]
    run = {
        "method": method, "checkpointing": checkpointing, "steps": steps, "step_seconds": round(seconds, 4),
        "tokens_per_s": round(page["seq_len"] / seconds, 1), "reply_tokens_per_s": round(page["reply_tokens"] / seconds, 1),
        "trainable": sum(p.numel() for p in trainable), "loss_first_last": [losses[0], losses[-1]],
        "peak_memory_gb": None, "peak_memory_gib": None, "peak_reserved_gb": None,
    }  # fmt: skip
    if cuda:
        run["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        run["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        run["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return run


def versus_guide(shape: str, method: str, peak_gb: float | None) -> str:
    """Where the peak stands against the guide's range for an 8B model: within, below or above."""
    if shape != "qwen3-vl-8b" or peak_gb is None:
        return "n/a"
    low, high = GUIDE_GB[method]
    return "below" if peak_gb < low else "above" if peak_gb > high else "within"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown(result: dict) -> list[str]:
    page, params = result["page"], result["params"]
    shape = "Qwen3-VL-8B shapes" if result["shape"] == "qwen3-vl-8b" else "the tiny two-layer Qwen3-VL shape"
    lines = [
        f"VLM training benchmark: {result['device']}, {shape} from config, random weights ({count(params['total'])} "
        f"parameters: language model {count(params['language_model'])}, vision encoder "
        f"{count(params['vision_encoder'])}); one page of {page['side_pixels']} x {page['side_pixels']} pixels "
        f"({page['patches']} patches, {page['image_tokens']} image tokens) + {page['text_tokens']} text tokens + "
        f"{page['reply_tokens']} reply tokens = {page['seq_len']} tokens, batch 1, loss on the reply only; LoRA r 16 on "
        f"the language model's q/k/v/o; mean of {result['steps']} steps after {result['warmup']}.",
        "",
        "| method | checkpointing | trainable | step s | tokens/s | reply tokens/s | peak GB | peak GiB | reserved GB "
        "| guide GB (8B) | vs guide |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        name = {"lora": "LoRA bf16", "qlora": "QLoRA NF4"}[r["method"]]
        guide = "{}-{}".format(*GUIDE_GB[r["method"]])
        ckpt = "on" if r["checkpointing"] else "off"
        if "error" in r:
            lines.append(f"| {name} | {ckpt} | | | | | | | | {guide} | {r['error']} |")
            continue
        lines.append(f"| {name} | {ckpt} | {count(r['trainable'])} | {r['step_seconds']} | {r['tokens_per_s']:.0f} | "
                     f"{r['reply_tokens_per_s']:.0f} | {gb(r['peak_memory_gb'])} | {gb(r['peak_memory_gib'])} | "
                     f"{gb(r['peak_reserved_gb'])} | {guide} | {r['vs_guide']} |")  # fmt: skip
    if result["device"] == "cpu":
        lines += ["", "CPU run of the tiny shape: the code path only; its speed and memory say nothing about a GPU."]
    return lines


def version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(package)
    except PackageNotFoundError:
        return None  # QLoRA's runs then fail with transformers' message, and LoRA's still measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-vl-8b")
    parser.add_argument("--device", default=None, help="default: cuda; cpu only with --shape tiny")
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora, qlora")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--pixels", type=int, default=1003520, help="page pixel cap (pages.render.max_pixels)")
    parser.add_argument(
        "--text-tokens", type=int, default=80, help="tokens besides the image and reply: chat, instruction, vision start/end"
    )
    parser.add_argument("--reply-tokens", type=int, default=512, help="reply tokens, the only ones with a loss")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(GUIDE_GB):
        parser.error(f"--methods: a comma-separated list of {', '.join(GUIDE_GB)}")
    if args.reply_tokens < 1 or args.text_tokens < 2 or args.steps < 1 or args.warmup < 0:
        parser.error("--reply-tokens and --steps must be at least 1, --text-tokens 2 (vision start/end), --warmup 0")

    import torch

    if args.device is None:
        if not torch.cuda.is_available():
            print("vlm_train_bench: no CUDA device here; it runs on a GPU machine (results kept from the last GPU run; "
                  "`--device cpu --shape tiny` checks the code path on CPU)")  # fmt: skip
            return
        args.device = "cuda"
    if args.device == "cpu" and args.shape != "tiny":
        parser.error("on CPU only --shape tiny runs (the code path); the 8B shape needs a GPU")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    import peft
    import transformers
    from transformers import Qwen3VLConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_io import write_results

    shape, ordinary = SHAPES[args.shape]
    config = Qwen3VLConfig(**shape, attn_implementation="sdpa")
    batch = page_inputs(config, ordinary, args.pixels, args.text_tokens, args.reply_tokens, args.device)
    cuda = args.device.startswith("cuda")
    runs, failed = [], False
    for method in methods:
        for checkpointing in {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]:
            try:
                run = measure(config, method, checkpointing, batch, args.steps, args.warmup, args.device)
                run["vs_guide"] = versus_guide(args.shape, method, run["peak_memory_gb"])
            except Exception as exc:  # one run's failure (out of memory above all) leaves the others to measure
                oom = isinstance(exc, torch.OutOfMemoryError)
                failed |= not oom
                traceback.print_exc()
                error = "out of memory" if oom else f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                run = {"method": method, "checkpointing": checkpointing, "error": error.replace("|", "/")}
            runs.append(run)
            print(f"vlm_train_bench: {run}", file=sys.stderr)
            free()
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "shape": args.shape, "model": shape,
        "params": parameter_counts(config), "page": batch["page"], "steps": args.steps, "warmup": args.warmup,
        "guide_gb_8b": GUIDE_GB, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "bitsandbytes": version("bitsandbytes"), "runs": runs,
    }  # fmt: skip
    write_results(args.out, "vlm_train", result, markdown(result))
    if failed:
        raise SystemExit("vlm_train_bench: a run failed (see its row and the traceback above)")


if __name__ == "__main__":
    main()
