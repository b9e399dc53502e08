"""Vision-language models for the page track: loading a model and its processor, the page chat, the language-model
modules LoRA adapts, and extracting one page's JSON reply.

Any image-text-to-text model transformers provides works (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM, Idefics3). The
Qwen-VL processors include a video processor that needs torchvision; where it is missing (the CPU machines here) they
cannot load, and the error says so: the CUDA image installs torchvision, and a SmolVLM/Idefics3 model loads anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

# Where each family keeps the vision-to-text projector (trained in full with `train_projector`).
PROJECTORS = ("connector", "multi_modal_projector", "merger")
# Module-path parts of the vision encoder: never adapted.
VISION_PARTS = ("vision_model", "vision_tower", "visual")
MLP_SUFFIXES = ("gate_proj", "up_proj", "down_proj")


class VisionModelError(RuntimeError):
    """A model or processor that cannot serve the page track; the message names the cause."""


@dataclass
class PageReply:
    text: str
    seconds: float
    tokens: int


def is_vision_model(model_dir: Path) -> bool:
    import json

    config = Path(model_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def load_processor(model_dir: Path):
    """The model's processor (image processor, tokenizer, chat template), right-padded with a pad token."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except Exception as exc:  # a missing torchvision surfaces as AttributeError/ImportError deep in transformers
        try:
            import torchvision  # noqa: F401

            missing = ""
        except ImportError:
            missing = (
                " Its processor may need torchvision (the Qwen-VL families' video processor), which is not installed "
                "here: install torchvision built for this torch, or use a SmolVLM/Idefics3 model on this machine."
            )
        raise VisionModelError(f"cannot load the processor of {model_dir} ({type(exc).__name__}: {exc}).{missing}") from exc
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise VisionModelError(f"{model_dir} has no image processor: the page track needs a vision-language model")
    tokenizer = processor.tokenizer
    if tokenizer.eos_token is None:
        raise VisionModelError(f"the tokenizer of {model_dir} has no EOS token: replies could not end in one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def inference_device() -> str | None:
    """Where a model answers pages: the GPU when there is one (None: where transformers loads it, the CPU)."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def load_model(model_dir: Path, dtype=None, quantization_config=None, device: str | None = None):
    """The model in `model_dir`; on `device` when given (bitsandbytes quantizes there as it loads)."""
    from transformers import AutoModelForImageTextToText

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
    except ValueError as exc:
        raise VisionModelError(f"{model_dir} is not an image-text-to-text model transformers knows ({exc})") from exc


def nf4_config(compute_dtype=None):
    """bitsandbytes NF4 (double quant) for the language model only: the vision encoder, the projector and the output
    head stay in full precision, as QLoRA recipes for vision-language models keep them (small, and image-critical)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=[f".*{part}" for part in (*VISION_PARTS, *PROJECTORS)] + ["lm_head"],  # regex, any depth
    )  # fmt: skip


def page_messages(instruction: str, reply: str | None = None) -> list[dict]:
    """The page chat: the image and the instruction from the user, then (for training) the JSON reply."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    if reply is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return messages


def in_vision_encoder(name: str) -> bool:
    return any(part in name.split(".") for part in VISION_PARTS)


def language_lora_targets(model, suffixes: list[str], include_mlp: bool) -> list[str]:
    """Full names of the language model's linear layers ending in `suffixes` (plus the MLP's with `include_mlp`): the
    vision encoder is never adapted, whatever names its layers share."""
    import torch

    wanted = tuple(suffixes) + (MLP_SUFFIXES if include_mlp else ())
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in wanted and not in_vision_encoder(name)
        and not name.endswith("lm_head")
    ]  # fmt: skip
    found = {name.rsplit(".", 1)[-1] for name in names}
    missing = [s for s in wanted if s not in found]
    if missing or not names:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise VisionModelError(
            f"LoRA targets {missing or list(wanted)} match no language-model linear layer; its layers: {layers}"
        )
    return names


def projector_module(model) -> str:
    """The name of the vision-to-text projector, for PEFT's modules_to_save."""
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTORS:
            return name.rsplit(".", 1)[-1]
    raise VisionModelError(f"no vision-to-text projector ({', '.join(PROJECTORS)}) in {type(model).__name__}")


def in_projector(name: str) -> bool:
    return any(part in name.split(".") for part in PROJECTORS)


def freeze_vision_encoder(model, train_projector: bool) -> int:
    """requires_grad off for the vision encoder (method full), and for the projector unless it is trained (some
    families keep it inside the encoder); returns how many parameters were frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if (in_vision_encoder(name) and not in_projector(name)) or (in_projector(name) and not train_projector):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def prompt_inputs(processor, image, instruction: str):
    """The processor's tensors for one page and the instruction, ending in the assistant's generation prompt."""
    text = processor.apply_chat_template(page_messages(instruction), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)


def extract(model, processor, image, instruction: str, max_new_tokens: int, temperature: float = 0.0) -> PageReply:
    """One page's reply (greedy unless `temperature` > 0), cut at the EOS token, decoded without special tokens."""
    import torch

    inputs = prompt_inputs(processor, image, instruction).to(model.device)
    tokenizer = processor.tokenizer
    sampling = {"do_sample": False} if temperature <= 0 else {"do_sample": True, "temperature": temperature, "top_k": 0}
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    seconds = time.perf_counter() - started
    ids = [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    # Only JSON's own whitespace is trimmed: the gate judges the reply as written.
    return PageReply(tokenizer.decode(ids, skip_special_tokens=True).strip(" \t\n\r"), seconds, len(ids))


def page_logits(model, processor, image, instruction: str, reply: str):
    """The logits of the page chat with `reply` (for merge-by-logits checks)."""
    import torch

    text = processor.apply_chat_template(page_messages(instruction, reply), tokenize=False)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        return model(**inputs).logits.float()
