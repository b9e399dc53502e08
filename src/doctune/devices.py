"""What this machine computes with: CPU features, bf16 in hardware, and the one precision policy every stage asks.

Training, merging and inference want different things from the same hardware, so the policy takes the purpose:

| purpose   | CUDA GPU with bf16 | other CUDA GPU | CPU with AMX          | other CPU |
|-----------|--------------------|----------------|-----------------------|-----------|
| train     | bf16               | fp16           | bf16 autocast (LoRA)  | fp32      |
| merge     | bf16               | fp32           | fp32                  | fp32      |
| inference | bf16               | fp32           | bf16                  | fp32      |

Merging stays fp32 off bf16 GPUs: the merge check compares logits within 1e-3. On a CPU only LoRA trains in bf16
autocast (its adapter weights stay fp32); full and QLoRA training keep fp32 there.
"""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path
from typing import Literal

Purpose = Literal["train", "merge", "inference"]
PRECISIONS = ("fp32", "bf16", "fp16")


class PrecisionError(ValueError):
    """A requested precision this hardware cannot run."""


@cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup v2 CPU quota (a container's limit, which
    affinity does not show: a 4-CPU pod on a 64-core node)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo cannot be read."""
    text = _cpuinfo()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_amx() -> bool:
    return "amx_int8" in cpu_flags()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def hardware_bf16() -> bool:
    """Whether this machine multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU with AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return "amx_bf16" in cpu_flags()


def precision(requested: str, purpose: Purpose, method: str = "lora") -> str:
    """fp32, bf16 or fp16 for `purpose` ("auto" follows the table in this module's docstring)."""
    import torch

    gpu = torch.cuda.is_available()
    if requested == "fp16" and not gpu:
        raise PrecisionError("precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    if requested != "auto":
        if requested not in PRECISIONS:
            raise PrecisionError(f"precision {requested!r}: expected auto or one of {', '.join(PRECISIONS)}")
        return requested
    if gpu:
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if purpose == "train" else "fp32"
    if purpose == "train":
        return "bf16" if method == "lora" and hardware_bf16() else "fp32"
    if purpose == "inference":
        return "bf16" if hardware_bf16() else "fp32"
    return "fp32"


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
