"""Replay text for CPT: a user-supplied dataset, or the base model's own answers to shipped general prompts.

Self-generated rehearsal keeps the model close to what it could already do; it is real model output, sampled
from the base model's own distribution (seeded) once per (model, prompts, settings) and cached.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from doctune.config import ReplayConfig
from doctune.models import resolve_model


class ReplayError(RuntimeError):
    """A replay dataset that cannot be read or holds no text."""


def general_prompts() -> list[str]:
    text = resources.files("doctune.synth").joinpath("data/general_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_replay_dataset(path: Path) -> list[str]:
    from datasets import load_dataset

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise ReplayError(f"synth.replay.dataset {path}: expected an existing .jsonl or .parquet file")
    data = load_dataset(kind, data_files=str(path), split="train")
    if "text" not in data.column_names:
        raise ReplayError(f"synth.replay.dataset {path}: no 'text' column (columns: {', '.join(data.column_names)})")
    texts = [t for t in data["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ReplayError(f"synth.replay.dataset {path}: no non-empty text records")
    return texts


def rehearsal(base_model: str, config: ReplayConfig, cache_dir: Path, seed: int) -> list[str]:
    """The base model's answers to the shipped prompts, as 'prompt\\n\\nanswer' texts: sampled at
    `config.temperature` with `seed` (greedy at 0); generated in bf16 where the hardware multiplies it (on the
    2-core AMX CPU, bf16 at batch 64 takes 0.31x the time of fp32 at batch 16)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from doctune.runtimes import hardware_bf16

    prompts = general_prompts()[: config.max_prompts or None]
    folder = resolve_model(base_model, cache_dir)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    dtype = torch.bfloat16 if hardware_bf16() else torch.float32
    sampling = {"do_sample": False}
    if config.temperature > 0:  # the whole distribution: no top-k or nucleus cut
        sampling = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0}
    settings = [base_model, weights, prompts, config.max_new_tokens, str(dtype), sampling, seed, config.batch_size]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]
    cached = Path(cache_dir) / "rehearsal" / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), config.batch_size):
            texts += _replies(model, tokenizer, prompts[start : start + config.batch_size], config.max_new_tokens, sampling)
    if not texts:
        raise ReplayError(
            f"base model {base_model!r} answered none of {len(prompts)} rehearsal prompts with text; "
            "give synth.replay.dataset a general-text dataset, or set synth.replay.share=0"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(texts))
    return texts


def _replies(model, tokenizer, prompts: list[str], max_new_tokens: int, sampling: dict) -> list[str]:
    import torch

    conversations = [[{"role": "user", "content": p}] for p in prompts]
    inputs = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    texts = []
    for prompt, row in zip(prompts, output[:, inputs["input_ids"].shape[1] :]):
        answer = tokenizer.decode(row, skip_special_tokens=True).strip()
        if answer:
            texts.append(f"{prompt}\n\n{answer}")
    return texts


def replay_texts(base_model: str, config: ReplayConfig, cache_dir: Path, seed: int) -> list[str]:
    if config.share <= 0:
        return []
    if config.dataset is not None:
        return load_replay_dataset(config.dataset)
    return rehearsal(base_model, config, cache_dir, seed)
