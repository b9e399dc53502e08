"""Replay text for CPT: a user-supplied dataset, or the base model's own answers to shipped general prompts.

Self-generated rehearsal keeps the model close to what it could already do; it is real model output, sampled
from the base model's own distribution (seeded) once per (model, prompts, settings) and cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from doctune.cache import Cache
from doctune.config import ReplayConfig
from doctune.devices import precision, torch_dtype
from doctune.generation import chat_replies
from doctune.models import resolve_model
from doctune.structured import leading_json, schema_match


class ReplayError(RuntimeError):
    """A replay dataset that cannot be read or holds no text."""


@dataclass(frozen=True)
class ReplayText:
    """One replay text; rehearsal texts also keep the prompt and the reply they were made of (they join SFT as
    chats), a user dataset's texts are text only."""

    text: str
    prompt: str = ""
    reply: str = ""
    structured: bool = False  # a verified structured-output (JSON) reply

    @classmethod
    def rehearsal(cls, prompt: str, reply: str, structured: bool = False) -> ReplayText:
        return cls(f"{prompt}\n\n{reply}", prompt, reply, structured)


def general_prompts() -> list[str]:
    text = resources.files("doctune.synth").joinpath("data/general_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def format_prompts() -> list[dict]:
    """Structured-output requests ({prompt, schema}): objects and phrasings other than the gate's format probes."""
    text = resources.files("doctune.synth").joinpath("data/format_prompts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


FORMAT_ATTEMPTS = 4  # greedy, then sampled replies, until one validates


def verified_format_replies(model, tokenizer, config: ReplayConfig, requests: list[dict]) -> list[ReplayText]:
    """The base model's own replies to structured-output requests, kept only where the reply starts with a JSON
    object (bare or fenced) valid against the request's schema, and cut right after it (the 135M model adds prose
    after the object the request said to send alone): the first valid one of a greedy and then sampled attempts.
    Rehearsal of general prompts alone left the tuned model answering a request for JSON with the abstention
    sentence; these chats rehearse the format on the model's own valid output."""
    found: dict[int, str] = {}
    for attempt in range(FORMAT_ATTEMPTS if config.temperature > 0 else 1):  # greedy twice gives the same reply
        pending = [i for i in range(len(requests)) if i not in found]
        if not pending:
            break
        conversations = [[{"role": "user", "content": requests[i]["prompt"]}] for i in pending]
        temperature = 0.0 if attempt == 0 else config.temperature
        replies = chat_replies(model, tokenizer, conversations, config.max_new_tokens, config.batch_size, temperature)
        for i, reply in zip(pending, replies):
            lead = leading_json(reply.text)
            if lead is not None and schema_match(lead[0], requests[i]["schema"]):
                found[i] = lead[1]
    return [ReplayText.rehearsal(requests[i]["prompt"], found[i], structured=True) for i in sorted(found)]


def load_replay_dataset(path: Path) -> list[ReplayText]:
    from datasets import load_dataset

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None or not path.is_file():
        raise ReplayError(f"synth.replay.dataset {path}: expected an existing .jsonl or .parquet file")
    data = load_dataset(kind, data_files=str(path), split="train")
    if "text" not in data.column_names:
        raise ReplayError(f"synth.replay.dataset {path}: no 'text' column (columns: {', '.join(data.column_names)})")
    texts = [ReplayText(t) for t in data["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ReplayError(f"synth.replay.dataset {path}: no non-empty text records")
    return texts


def rehearsal(base_model: str, config: ReplayConfig, cache_dir: Path, seed: int) -> list[ReplayText]:
    """The base model's answers to the shipped prompts: sampled at `config.temperature` with `seed` (greedy at 0),
    in the inference precision of this hardware (bf16 where it multiplies bf16: 0.31x the time of fp32 on the
    2-core AMX CPU at batch 64)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = general_prompts()[: config.max_prompts or None]
    requests = format_prompts()[: config.max_prompts or None]
    folder = resolve_model(base_model, cache_dir)
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    dtype = precision("auto", "inference")
    settings = [
        base_model,
        weights,
        prompts,
        requests,
        FORMAT_ATTEMPTS,
        config.max_new_tokens,
        dtype,
        config.temperature,
        seed,
        config.batch_size,
    ]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]

    def generate() -> list[dict]:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype)).eval()
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            replies = chat_replies(model, tokenizer, conversations, config.max_new_tokens, config.batch_size, config.temperature)
            texts = [ReplayText.rehearsal(p, r.text) for p, r in zip(prompts, replies) if r.text]
            texts += verified_format_replies(model, tokenizer, config, requests)
        if not texts:
            raise ReplayError(
                f"base model {base_model!r} answered none of {len(prompts)} rehearsal prompts with text; "
                "give synth.replay.dataset a general-text dataset, or set synth.replay.share=0"
            )
        return [asdict(t) for t in texts]

    return [ReplayText(**t) for t in Cache(Path(cache_dir)).json("rehearsal", f"{key}.json", generate)]


def replay_texts(base_model: str, config: ReplayConfig, cache_dir: Path, seed: int) -> list[ReplayText]:
    if config.share <= 0:
        return []
    if config.dataset is not None:
        return load_replay_dataset(config.dataset)
    return rehearsal(base_model, config, cache_dir, seed)
