"""GPU training benchmark: tokens/s and model FLOPs utilisation (MFU) of LoRA, QLoRA and full fine-tuning of a 1B-class
Llama built from its config (Llama-3.2-1B's shapes, random weights) in bf16, on one CUDA GPU.

Two kinds of rows, batch 4 x 2048 tokens, every position labelled:
- step: a plain PyTorch training step (bf16 weights, bf16 autocast, fused AdamW, SDPA attention, no gradient
  checkpointing), one variant at a time: PEFT's LoRA as it comes (r=16 on every linear layer of the blocks, fp32
  adapter whose input PEFT casts to fp32, dropout 0.05) and with that cast left out (`adapter_inputs_in_compute_dtype`)
  and dropout 0; liger-kernel's RMSNorm, SwiGLU and RoPE (`apply_fused_kernels`), and its fused linear cross-entropy.
  A variant computes the same function: its first loss matches the plain model's on the same weights and batch.
- sft: doctune's own SFT training job (`doctune.train.launch.run_job`: TRL's SFTTrainer with doctune's settings,
  packing, TRL's fused LM head), full, LoRA and QLoRA, with `kernels: none` and `auto` (liger where it runs). The
  step time is measured by a callback from the fourth optimizer step on, so loading and kernel compilation stay out.

Model FLOPs per token are counted from the shapes (matrix products only, PaLM's convention): forward
2 x (block weights + LM head) + 4 x layers x sequence x hidden for attention scores and values; a full step is
3x the forward (weight and input gradients), an adapter step 2x (input gradients only: the base is frozen).
MFU is achieved model FLOP/s over the GPU's dense bf16 peak. Without CUDA it exits with a message and writes
nothing; `--tiny` runs every row on a small model (on the CPU where there is no GPU) to check the code paths. Each
row runs in a Python of its own: liger-kernel replaces transformers' Llama classes process-wide, so in one process every
row after a liger row would run liger's kernels too.
Writes bench/results/gpu_train.json and gpu_train.md; `--profile DIR` also writes the top kernels of two steps of
the plain LoRA and full rows there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peak, FLOP/s, by the name torch reports (datasheet figures, no sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0,
)  # fmt: skip
LLAMA_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip


@dataclass(frozen=True)
class StepVariant:
    """A plain PyTorch step with one change at a time."""

    name: str
    method: str  # full or lora
    dropout: float = 0.0  # LoRA dropout
    input_cast: bool = False  # PEFT's cast of each adapter's input to the adapter's fp32
    liger: bool = False  # liger-kernel's RMSNorm, SwiGLU and RoPE
    fused_ce: bool = False  # liger-kernel's fused linear cross-entropy
    position_ids: bool = False  # passed as packed rows pass them
    compile: bool = False  # torch.compile of the model

    @property
    def needs_cuda(self) -> bool:
        """liger's kernels are Triton's; compiling the 1B model on CPU only checks code that runs on the GPU."""
        return self.liger or self.fused_ce or self.compile


STEP_VARIANTS = [
    StepVariant("full", "full"),
    StepVariant("full, liger layers", "full", liger=True),
    StepVariant("full, liger layers + fused CE", "full", liger=True, fused_ce=True),
    StepVariant("full, position ids", "full", position_ids=True),
    StepVariant("lora (PEFT as it comes: input cast, dropout 0.05)", "lora", dropout=0.05, input_cast=True),
    StepVariant("lora, no input cast, dropout 0.05", "lora", dropout=0.05),
    StepVariant("lora, no input cast, dropout 0.05, position ids", "lora", dropout=0.05, position_ids=True),
    StepVariant("lora, no input cast, dropout 0", "lora"),
    StepVariant("lora, no input cast, dropout 0, liger layers", "lora", liger=True),
    StepVariant("lora, no input cast, dropout 0, torch.compile", "lora", compile=True),
    StepVariant("full, torch.compile", "full", compile=True),
]


@dataclass(frozen=True)
class SftVariant:
    """doctune's SFT job with these settings."""

    method: str
    kernels: str
    extra: tuple[tuple[str, object], ...] = ()  # further SFTConfig arguments

    @property
    def name(self) -> str:
        return f"sft {self.method}, kernels {self.kernels}" + "".join(f", {k} {v}" for k, v in self.extra)

    @property
    def needs_cuda(self) -> bool:
        return dict(self.extra).get("torch_compile", False)


SFT_VARIANTS = [
    SftVariant("full", "none"),
    SftVariant("full", "auto"),
    SftVariant("lora", "none"),
    SftVariant("lora", "auto"),
    SftVariant("lora", "auto", (("torch_compile", True),)),
    SftVariant("qlora", "auto"),
]


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


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_row(variant: StepVariant, config, args, device: str, profile_dir: Path | None) -> dict:
    """One plain PyTorch variant: `args.steps` timed steps after `args.warmup`."""
    import torch
    from transformers import LlamaForCausalLM

    from doctune.train.core import adapter_inputs_in_compute_dtype

    name, method = variant.name, variant.method
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device (no fp32 copy on the host)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if variant.liger or variant.fused_ce:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=variant.liger, rms_norm=variant.liger, swiglu=variant.liger, cross_entropy=False,
            fused_linear_cross_entropy=variant.fused_ce, model=model,
        )  # fmt: skip
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # PEFT's "all-linear", doctune's default: every linear layer of the blocks, not the LM head.
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=variant.dropout, target_modules="all-linear")
        model = get_peft_model(model, lora)
        if not variant.input_cast:
            adapter_inputs_in_compute_dtype(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    generator = torch.Generator(device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device, generator=generator)
    extra = {"position_ids": torch.arange(args.seq_len, device=device).repeat(args.batch, 1)} if variant.position_ids else {}
    forward = torch.compile(model) if variant.compile else model
    model.train()

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(args.warmup)]
    synchronize()
    reset_peak_memory()
    started = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    if profile_dir is not None:
        with profiled(profile_dir, name):
            step(), step()
    row = {
        "kind": "step", "method": name, "steps": args.steps, "step_seconds": round(seconds, 4),
        "tokens_per_s": round(args.batch * args.seq_len / seconds), "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4), "trainable": sum(p.numel() for p in trainable),
        "peak_memory_gib": peak_memory_gib(), "flops_factor": 3 if method == "full" else 2,
    }  # fmt: skip
    return row


@contextlib.contextmanager
def profiled(folder: Path, name: str):
    """The operators and kernels of what runs inside, by device time and by host time, into `folder`."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        yield
        synchronize()
    wall = time.perf_counter() - started
    table = prof.key_averages()
    device_sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = [
        f"{name}: {wall:.3f} s wall under the profiler",
        table.table(sort_by=device_sort, row_limit=40, max_name_column_width=70),
        table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70),
    ]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
    (folder / f"profile-{slug}.txt").write_text("\n\n".join(text))


class ProfileSteps:
    """Profiles two optimizer steps from `first` on (a TrainerCallback's hooks)."""

    def __init__(self, first: int, folder: Path, name: str):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == first:
                    self.context = profiled(folder, name)
                    self.context.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == first + 2:
                    self.context.__exit__(None, None, None)

        self.callback = Callback()


class StepTimer:
    """Times optimizer steps `first` to `last` (a TrainerCallback's hooks), synchronizing the device around them."""

    def __init__(self, first: int, last: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == first:
                    synchronize()
                    timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step <= last:
                    synchronize()
                    timer.ended, timer.steps = time.perf_counter(), state.global_step - first

        self.callback = Callback()
        self.started = self.ended = 0.0
        self.steps = 0

    @property
    def step_seconds(self) -> float:
        return (self.ended - self.started) / self.steps


def write_model(config, folder: Path) -> Path:
    """A random-init model in bf16 with a word-level tokenizer whose vocabulary fits inside the model's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(61)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(folder)
    return folder


def sft_row(variant: SftVariant, model_dir: Path, config, args, work: Path) -> dict:
    """doctune's SFT job on `args.warmup + args.steps` optimizer steps of full 2048-token rows."""
    method, kernels = variant.method, variant.kernels
    import torch
    from datasets import Dataset

    from doctune.config import SftConfig
    from doctune.train.core import TrainJob, default_learning_rate
    from doctune.train.launch import run_job

    folder = Path(tempfile.mkdtemp(prefix=f"sft-{method}-{kernels}-", dir=work))
    steps = args.warmup + args.steps + (2 if args.profile else 0)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (steps * args.batch, args.seq_len), generator=generator).tolist()
    Dataset.from_dict({"input_ids": ids, "labels": ids}).save_to_disk(str(folder / "data" / "train"))
    settings = SftConfig(
        method=method, kernels=kernels, batch_size=args.batch, gradient_accumulation_steps=1, max_length=args.seq_len,
        max_steps=steps, warmup_ratio=0.0, save_steps=10**6, eval_steps=10**6, logging_steps=10**6,
        precision="bf16" if torch.cuda.is_available() else "fp32", **dict(variant.extra),
    )  # fmt: skip
    job = TrainJob(
        stage="sft", settings=settings.model_dump(mode="json"), model_dir=str(model_dir), tokenizer_dir=str(model_dir),
        data_dir=str(folder / "data"), checkpoint_dir=str(folder / "checkpoints"), output_dir=str(folder / "out"),
        learning_rate=default_learning_rate("sft", method),
    )  # fmt: skip
    timer = StepTimer(first=args.warmup, last=args.warmup + args.steps)
    callbacks = [timer.callback]
    if args.profile:  # two more steps, after the timed ones
        callbacks.append(ProfileSteps(args.warmup + args.steps, args.profile, variant.name).callback)
    reset_peak_memory()
    result = run_job(job, callbacks=callbacks)
    seconds = timer.step_seconds
    return {
        "kind": "sft", "method": f"{variant.name} -> {result['kernels']}", "steps": timer.steps,
        "step_seconds": round(seconds, 4), "tokens_per_s": round(args.batch * args.seq_len / seconds),
        "first_loss": round(result["loss_history"][0], 4) if result["loss_history"] else None,
        "last_loss": None, "trainable": None, "peak_memory_gib": peak_memory_gib(),
        "flops_factor": 3 if method == "full" else 2, "padding_fraction": result["padding_fraction"],
    }  # fmt: skip


def row_names() -> list[tuple[str, str]]:
    """(kind, name) of every row, in the order they run."""
    return [("step", v.name) for v in STEP_VARIANTS] + [("sft", v.name) for v in SFT_VARIANTS]


def make_row(kind: str, name: str, config, args, device: str, model_dir: Path | None) -> dict:
    if kind == "step":
        variant = next(v for v in STEP_VARIANTS if v.name == name)
        uses_liger = variant.liger or variant.fused_ce
        if (variant.needs_cuda and device != "cuda") or (uses_liger and not liger_runs()):
            raise RuntimeError("needs a CUDA GPU" + (" and liger-kernel" if uses_liger else ""))
        return step_row(variant, config, args, device, args.profile)
    sft = next(v for v in SFT_VARIANTS if v.name == name)
    if sft.needs_cuda and device != "cuda":
        raise RuntimeError("needs a CUDA GPU")
    with tempfile.TemporaryDirectory(prefix="gpu-train-bench-") as tmp:
        return sft_row(sft, model_dir, config, args, Path(tmp))


def liger_runs() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


class RowFailed(RuntimeError):
    """A row's own process failed; the message is its error."""


def row_in_own_process(kind: str, name: str, argv: list[str], model_dir: Path | None) -> dict:
    """One row in a fresh Python: liger-kernel patches transformers' Llama classes process-wide, so a row made after
    a liger row in the same process would run liger's kernels whatever it asks for."""
    with tempfile.TemporaryDirectory(prefix="gpu-train-row-") as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, __file__, *argv, "--row", f"{kind}:{name}", "--row-out", str(out)]
        if model_dir is not None:
            command += ["--model-dir", str(model_dir)]
        code = subprocess.run(command).returncode
        if not out.is_file():
            raise RuntimeError(f"the row's process exited with {code} and wrote no result")
        row = json.loads(out.read_text())
    if "error" in row:
        raise RowFailed(row["error"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--tiny", action="store_true", help="a small model, on the CPU without a GPU: checks the code")
    parser.add_argument("--only", choices=["step", "sft"], default=None, help="one kind of row")
    parser.add_argument("--match", default=None, help="only rows whose name holds one of these (';'-separated)")
    parser.add_argument("--profile", type=Path, default=None, help="write each row's top operators and kernels here")
    parser.add_argument("--log", type=Path, default=None, help="append each row as a JSON line here as it is made")
    parser.add_argument("--in-process", action="store_true", help="all rows in this process (no liger rows then)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # kind:name, in a row's own process
    parser.add_argument("--row-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu_train_bench: no CUDA device here; it runs on a GPU machine (results kept from the last GPU run)")
        return
    import transformers
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_io import write_results

    if args.tiny:
        args.seq_len = min(args.seq_len, 128)
    config = LlamaConfig(**(LLAMA_TINY if args.tiny else LLAMA_1B), attn_implementation="sdpa")
    device = "cuda" if cuda else "cpu"
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.row:  # a row's own process
        kind, name = args.row.split(":", 1)
        try:
            row = make_row(kind, name, config, args, device, args.model_dir)
        except Exception as exc:
            traceback.print_exc()
            row = {"error": f"{type(exc).__name__}: {exc}"}
        args.row_out.write_text(json.dumps(row))
        return

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(device_name, args.peak_tflops) if cuda else None
    selected = [
        (kind, name) for kind, name in row_names()
        if args.only in (None, kind) and (not args.match or any(part in name for part in args.match.split(";")))
    ]  # fmt: skip
    if args.in_process and liger_runs():  # liger's process-wide patches would reach every later row
        selected = [(kind, name) for kind, name in selected if "liger" not in name and "kernels auto" not in name]
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-train-bench-") as tmp:
        model_dir = write_model(config, Path(tmp) / "model") if any(k == "sft" for k, _ in selected) else None
        for kind, name in selected:
            try:
                if args.in_process:
                    row = make_row(kind, name, config, args, device, model_dir)
                else:
                    row = row_in_own_process(kind, name, argv, model_dir)
            except Exception as exc:  # one failing row must not cost the others' numbers
                failed.append({"method": name, "error": str(exc) if isinstance(exc, RowFailed) else repr(exc)})
                traceback.print_exc()
                continue
            flops = forward_flops_per_token(config, args.seq_len) * row.pop("flops_factor")
            row["model_tflops_per_s"] = round(row["tokens_per_s"] * flops / 1e12, 1)
            row["mfu"] = round(row["model_tflops_per_s"] * 1e12 / peak, 3) if peak else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.log:
                with open(args.log, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            reset_peak_memory()

    import peft

    result = {
        "device": device_name, "peak_bf16_tflops": peak / 1e12 if peak else None, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "model": LLAMA_TINY if args.tiny else LLAMA_1B,
        "batch": args.batch, "seq_len": args.seq_len, "runs": rows, "failed": failed,
        "forward_flops_per_token": forward_flops_per_token(config, args.seq_len),
    }  # fmt: skip
    for package in ("trl", "liger_kernel", "bitsandbytes"):
        try:
            result[package] = __import__("importlib.metadata").metadata.version(package.replace("_", "-"))
        except Exception:
            result[package] = None
    lines = [
        f"GPU training benchmark: {device_name}, Llama {'tiny' if args.tiny else '1B-class'} from config, bf16, batch "
        f"{args.batch} x {args.seq_len} tokens, mean of {args.steps} steps after {args.warmup}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, trl {result['trl']}, "
        f"liger-kernel {result['liger_kernel']}, bitsandbytes {result['bitsandbytes']}.",
        "",
        "| kind | method | step s | tokens/s | model TFLOP/s | MFU | first loss | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['kind']} | {r['method']} | {r['step_seconds']} | {r['tokens_per_s']} | "
                     f"{r['model_tflops_per_s']} | {mfu} | {r['first_loss']} | {r['peak_memory_gib']} |")  # fmt: skip
    for f in failed:
        lines.append(f"| failed | {f['method']} | {f['error'][:200]} | | | | | |")
    if args.tiny:  # a code check, not a measurement: the kept GPU results stay
        print("\n".join(lines))
        return
    write_results(args.out, "gpu_train", result, lines)


if __name__ == "__main__":
    main()
