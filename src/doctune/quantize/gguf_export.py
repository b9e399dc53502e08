"""A transformers model folder written as one GGUF file with the `gguf` package, as llama.cpp's converter does.

Tensor names come from gguf's own name map; Llama q/k projections are permuted to llama.cpp's rotary layout;
the byte-level BPE vocabulary, merges, special tokens and chat template travel in the file. Norms stay f32;
rows whose length is not a multiple of the block size fall back to f16; below 8 bits the token embedding
(also the output layer when tied) stays q8_0, as llama.cpp's own quantizer keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class GgufExportError(RuntimeError):
    """The model cannot be written as the requested GGUF type."""


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # gguf.MODEL_ARCH member
    permute_qk: bool  # HF's rotate-half q/k layout -> llama.cpp's interleaved one
    pre_tokenizer: str  # llama.cpp pre-tokenizer when none is known for the model


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True, pre_tokenizer="default"),
    "Qwen2ForCausalLM": Architecture("QWEN2", permute_qk=False, pre_tokenizer="qwen2"),
}
FLOAT_TYPES = ("F32", "F16", "BF16")


def writable(qtype) -> bool:
    """Whether the gguf package can quantize to `qtype` (its numpy quantizers cover only some types)."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:  # gguf has no numpy quantizer for this type: a finished answer, not a gap
        return False
    return True


def writable_name(name: str) -> bool:
    """Whether the gguf package writes GGUF type `name` itself (else llama.cpp's quantizer may: `requantize`)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, name.upper(), None)
    return qtype is not None and writable(qtype)


def ggml_type(name: str, architecture: str):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, name.upper(), None)
    if qtype is None or not writable(qtype):
        usable = [
            t.name.lower() for t in gguf.GGMLQuantizationType if hasattr(gguf.LlamaFileType, f"MOSTLY_{t.name}") and writable(t)
        ]
        reason = "is not a ggml type" if qtype is None else "cannot be written by the gguf package"
        raise GgufExportError(
            f"GGUF type {name} for {architecture}: {reason} (writable: {', '.join(usable)}; through llama.cpp's quantizer: "
            "q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m, q2_k, iq4_nl and the other LLAMA_FTYPE_MOSTLY_* names)"
        )
    return qtype


def gguf_tensor_names(config):
    """Map of a transformers model's tensor names to GGUF's ("model.layers.0.self_attn.q_proj.weight" ->
    "blk.0.attn_q.weight"), from gguf's own name map for the model's architecture."""
    import gguf

    architecture = (config.architectures or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise GgufExportError(
            f"architecture {architecture} is not supported by doctune's GGUF writer (supported: {', '.join(ARCHITECTURES)})"
        )
    model_arch = gguf.MODEL_ARCH[ARCHITECTURES[architecture].gguf_name]
    return gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (inverse of transformers' GGUF loader)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """All safetensors shards of a folder as float32 numpy arrays (bf16 shards included)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GgufExportError(f"{folder} holds no safetensors weights")
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = handle.get_tensor(name).float().numpy()
    return tensors


def vocabulary(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types: added special tokens are CONTROL, other added ones USER_DEFINED."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def tensor_type(name: str, array: np.ndarray, target, low_bit: bool):
    """The ggml type a tensor is stored as in a file of type `target`."""
    import gguf

    if array.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    if target.name in FLOAT_TYPES:
        return target
    chosen = gguf.GGMLQuantizationType.Q8_0 if low_bit and name == "token_embd.weight" else target
    block = gguf.GGML_QUANT_SIZES[chosen][0]
    return chosen if array.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def encode(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def write_gguf(model_dir: Path, target: Path, type_name: str, pre_tokenizer: str | None = None) -> dict:
    """Write `model_dir` as a GGUF file of `type_name` (f16, q8_0, q4_0, ...); returns what was written."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    architecture = (config.architectures or ["?"])[0]
    try:
        names = gguf_tensor_names(config)
    except GgufExportError as error:
        raise GgufExportError(f"GGUF type {type_name}: {error}") from None
    arch = ARCHITECTURES[architecture]
    target_type = ggml_type(type_name, architecture)
    file_type = getattr(gguf.LlamaFileType, "ALL_F32" if target_type.name == "F32" else f"MOSTLY_{target_type.name}", None)
    if file_type is None:
        raise GgufExportError(f"GGUF type {type_name} for {architecture}: llama.cpp has no file type for it")
    low_bit = target_type.name not in FLOAT_TYPES and target_type.name != "Q8_0"
    model_arch = gguf.MODEL_ARCH[arch.gguf_name]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[model_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(model_dir).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    rope_type = rope.get("rope_type", "default")
    if rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType[rope_type.upper()])
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings") or config.max_position_embeddings))
    elif rope_type != "default":
        raise GgufExportError(f"GGUF type {type_name}: RoPE scaling {rope_type!r} has no llama.cpp equivalent")
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or arch.pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise GgufExportError(f"GGUF type {type_name}: the tokenizer of {model_dir} is not a BPE tokenizer with merges")
    special.chat_template = tokenizer.chat_template or special.chat_template  # chat_template.jinja included
    special.add_to_gguf(writer, quiet=True)

    counts: dict[str, int] = {}
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, array in read_state_dict(Path(model_dir)).items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"GGUF type {type_name}: tensor {hf_name} of {architecture} has no GGUF name")
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            array = permute(array, n_head, n_head)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            array = permute(array, n_head, n_kv)
        qtype = tensor_type(name, array, target_type, low_bit)
        writer.add_tensor(name, encode(array, qtype), raw_dtype=qtype if qtype.name not in ("F32", "F16") else None)
        counts[qtype.name.lower()] = counts.get(qtype.name.lower(), 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "architecture": architecture,
        "type": type_name,
        "tensor_types": counts,
        "pre_tokenizer": pre_tokenizer or arch.pre_tokenizer,
    }


def llama_cpp_file_type(type_name: str) -> int | None:
    """llama.cpp's file type for `type_name` (q4_k_m, q5_k_m, q6_k, iq4_nl, ...), or None when it has none."""
    try:
        import llama_cpp
    except ImportError:  # the serve extra is not installed
        return None
    return getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)


def requantize(source: Path, target: Path, type_name: str, threads: int, imatrix: dict[str, np.ndarray] | None = None) -> dict:
    """A GGUF of `type_name` made from the f16 GGUF `source` by llama.cpp's own quantizer (the K-quants, which the gguf
    package cannot write), weighting each weight's rounding error by `imatrix` (GGUF tensor name -> mean squared input
    activation per column) where given. Tensors whose rows do not split into 256-value K blocks fall back to another
    type, as llama.cpp's quantizer decides (it logs which)."""
    import ctypes

    import llama_cpp

    file_type = llama_cpp_file_type(type_name)
    if file_type is None:
        raise GgufExportError(f"GGUF type {type_name}: llama.cpp has no file type of that name")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = file_type, threads
    if imatrix:  # llama.cpp reads the entries up to one without a name
        arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in imatrix.items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
        for entry, (name, values) in zip(entries, arrays.items()):
            entry.name, entry.size = name.encode(), values.size
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.is_file():
        raise GgufExportError(f"GGUF type {type_name}: llama.cpp's quantizer failed (code {code}) on {source.name}")
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(target)).tensors:  # what each tensor became, fallbacks included
        counts[tensor.tensor_type.name.lower()] = counts.get(tensor.tensor_type.name.lower(), 0) + 1
    quantizer = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    return {"type": type_name, "tensor_types": counts, "quantizer": quantizer, "importance_matrix": bool(imatrix)}


def pre_tokenizer_of_gguf(path: Path) -> str | None:
    """`tokenizer.ggml.pre` of an existing GGUF file (e.g. the one the bundled base model came from)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None
