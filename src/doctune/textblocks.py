"""Text packed into fixed blocks of token ids: CPT's training blocks and every perplexity measurement."""

from __future__ import annotations


def pack(texts: list[str], tokenizer, block_size: int) -> tuple[list[list[int]], int]:
    """Texts joined with EOS, cut into full blocks of block_size tokens; returns (blocks, tokens dropped at the end)."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    full = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(full)], len(stream) - full * block_size


def perplexity_blocks(texts: list[str], tokenizer, block_size: int, count: int) -> list[list[int]]:
    """Up to `count` blocks for a perplexity measurement, evenly spaced over the text (the first blocks would all
    come from its first document). Text too short to fill one block gives one shorter block, so a small hold-out
    is still measured, on every token it has."""
    blocks, _ = pack(texts, tokenizer, block_size)
    if blocks:
        if len(blocks) <= count:
            return blocks
        return [blocks[i * len(blocks) // count] for i in range(count)]
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return [stream] if len(stream) > 1 else []
