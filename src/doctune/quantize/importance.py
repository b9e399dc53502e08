"""A domain importance matrix for llama.cpp's quantizer, computed with the merged model in transformers.

For every linear layer that becomes a GGUF weight, the mean over tokens of each input column's squared activation,
as llama.cpp's imatrix tool accumulates it (`sum(x_j^2) / n`), here on the text the model was adapted to. The
quantizer weights each weight's rounding error by its column's value, so the columns these documents drive hardest
lose least. The text is the CPT training text: never the held-out text the variants are then scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from doctune.devices import cuda_available, precision, torch_dtype
from doctune.quantize.gguf_export import gguf_tensor_names
from doctune.textblocks import perplexity_blocks


@dataclass
class ImportanceMatrix:
    values: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF tensor name -> mean squared input per column
    blocks: int = 0
    tokens: int = 0

    def summary(self) -> dict:
        return {"tensors": len(self.values), "blocks": self.blocks, "tokens": self.tokens}


def importance_matrix(model_dir: Path, texts: list[str], block_size: int, max_blocks: int) -> ImportanceMatrix:
    """The importance matrix of `model_dir` on up to `max_blocks` blocks of `texts` (spread over the text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = perplexity_blocks(texts, tokenizer, block_size, max_blocks)
    if not blocks:
        return ImportanceMatrix()
    device = "cuda" if cuda_available() else "cpu"
    dtype = torch_dtype(precision("auto", "inference"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    names = gguf_tensor_names(model.config)
    tied = getattr(model.config, "tie_word_embeddings", False)
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def accumulate(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums[name] + (x * x).sum(dim=0) if name in sums else (x * x).sum(dim=0)

        return hook

    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (tied and module_name == "lm_head"):
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if gguf_name is not None:
            handles.append(module.register_forward_pre_hook(accumulate(gguf_name)))
    tokens = 0
    try:
        with torch.no_grad():
            for block in blocks:
                model(input_ids=torch.tensor([block], device=device))
                tokens += len(block)
    finally:
        for handle in handles:
            handle.remove()
    values = {name: (total / tokens).float().cpu().numpy() for name, total in sums.items()}
    return ImportanceMatrix(values, blocks=len(blocks), tokens=tokens)
