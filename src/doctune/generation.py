"""Chat replies from a transformers model: the one generation loop of the runtimes, the rehearsal and the local teacher.

Prompts are rendered with the model's own chat template, batched with left padding; each reply ends at the
tokenizer's EOS (the end-of-turn token) and is decoded without special tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Reply:
    text: str
    tokens: int
    seconds: float


def left_padded(tokenizer):
    """The tokenizer set up for batched generation: left padding, a pad token (EOS where there is none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sampling_settings(temperature: float) -> dict:
    """Greedy at 0; otherwise samples from the whole distribution (no top-k or nucleus cut)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def chat_replies(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0
) -> list[Reply]:
    """One reply per conversation (greedy unless `temperature` > 0), in batches of `batch_size`."""
    import torch

    left_padded(tokenizer)
    replies = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling_settings(temperature)
            )
        seconds = (time.perf_counter() - started) / len(batch)
        for row in out[:, encoded["input_ids"].shape[1] :]:
            ids = [int(t) for t in row if int(t) != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            replies.append(Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), seconds))
    return replies
