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
    continuation_logprob: float | None = None  # of a given reply to the same prompt, where one was asked for


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
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    continuations: list[tuple[list[int], int]] | None = None,
) -> list[Reply]:
    """One reply per conversation (greedy unless `temperature` > 0), in batches of `batch_size` prompts of similar
    length (less padding), in the conversations' order.

    `continuations`: per conversation, its prompt's token ids followed by a reply to score and where that reply
    starts (`doctune.chat.reply_sequences`); each Reply then carries the reply's mean log-probability, computed on
    the prompt's cache before generating from it, so the prompt is encoded once for both."""
    import torch

    left_padded(tokenizer)
    if continuations is None:
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        rows = [(ids, []) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    else:
        rows = [(ids[:start], ids[start:]) for ids, start in continuations]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    replies: list[Reply | None] = [None] * len(rows)
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        encoded = tokenizer.pad({"input_ids": [rows[i][0] for i in batch]}, return_tensors="pt").to(model.device)
        started = time.perf_counter()
        with torch.no_grad():
            cache, logprobs = None, [None] * len(batch)
            if continuations is not None:
                cache, logprobs = _scored_prefill(model, encoded, [rows[i][1] for i in batch], tokenizer.pad_token_id)
            out = model.generate(
                **encoded, past_key_values=cache, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                **sampling_settings(temperature),
            )  # fmt: skip
        seconds = (time.perf_counter() - started) / len(batch)
        for i, row, logprob in zip(batch, out[:, encoded["input_ids"].shape[1] :], logprobs):
            ids = [int(t) for t in row if int(t) != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            replies[i] = Reply(tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), seconds, logprob)
    return replies


def _scored_prefill(model, encoded, tails: list[list[int]], pad_id: int):
    """The cache of every prompt but its last token (generate goes on from there), and the mean log-probability of
    each tail as the continuation of its full prompt, scored on a copy of that cache (a sliding-window layer cannot
    be cropped back)."""
    import copy

    import torch

    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefill = model(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1
    )  # fmt: skip
    cache = prefill.past_key_values
    width = max(len(t) for t in tails)
    tail_ids = torch.tensor([t + [pad_id] * (width - len(t)) for t in tails], device=ids.device)
    tail_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tails], device=ids.device)
    # Position j of the step predicts tail[j]: the prompt's last token, then the tail but its last token. Padding
    # at the end of a short tail is never attended to by a real token (causal), so it changes no score.
    step = torch.cat([ids[:, -1:], tail_ids[:, :-1]], dim=1)
    logits = model(
        input_ids=step, attention_mask=torch.cat([mask, tail_mask[:, :-1]], dim=1),
        position_ids=positions[:, -1:] + torch.arange(width, device=ids.device), past_key_values=copy.deepcopy(cache),
    ).logits  # fmt: skip
    token_logprobs = torch.log_softmax(logits.float(), -1).gather(2, tail_ids[:, :, None])[:, :, 0] * tail_mask
    return cache, [float(v) for v in token_logprobs.sum(1) / tail_mask.sum(1).clamp(min=1)]
