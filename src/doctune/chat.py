"""Chat messages as every stage uses them: the fixed texts, validation, rendering with the model's template, and
cutting an over-long user turn in the middle.

The system prompt and the abstention sentences are stored with the datasets (records.SYSTEM_PROMPT_FILE,
records.ABSTENTIONS_FILE) and reused verbatim by training, the gate and serving.
"""

from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")
CUT_MARK = "\n…\n"

SYSTEM_PROMPT = (
    "You are a documentation assistant. Answer the question using only the documentation you were given. "
    "If the context does not contain the answer, say so instead of guessing."
)
# The reply that declines, in the language of the passages it declines from: a reader of Spanish documentation is
# told in Spanish. Languages not here decline in English.
ABSTENTIONS = {
    "en": "I cannot answer that from the provided documentation.",
    "fr": "Je ne peux pas répondre à cette question à partir de la documentation fournie.",
    "de": "Das kann ich anhand der bereitgestellten Dokumentation nicht beantworten.",
    "es": "No puedo responder a eso con la documentación proporcionada.",
    "it": "Non posso rispondere a questa domanda in base alla documentazione fornita.",
    "pt": "Não posso responder a isso com base na documentação fornecida.",
    "nl": "Ik kan dat niet beantwoorden op basis van de verstrekte documentatie.",
}
ABSTENTION = ABSTENTIONS["en"]


def abstention_in(lang: str | None, sentences: dict[str, str] = ABSTENTIONS) -> str:
    """The abstention sentence for passages in `lang` (a langdetect code; English where `sentences` has none)."""
    return sentences.get(lang or "") or sentences.get("en") or next(iter(sentences.values()))


class InvalidMessages(ValueError):
    """Messages that cannot be rendered or trained on; the message says which one and why."""


def conversation(user: str, system: str | None = None) -> list[dict]:
    """A prompt as served: the system prompt (when there is one), then the user turn."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


CONTEXT_HEADER = "Context:\n"


def rag_user_message(question: str, passages: list[str]) -> str:
    """A user turn that carries retrieved context, numbered in the order given."""
    context = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(passages, start=1))
    return f"{CONTEXT_HEADER}{context}\n\nQuestion: {question}"


def context_passages(user_text: str) -> list[str]:
    """The passages of a RAG user turn as rag_user_message writes it, in prompt order, without their numbers."""
    if not carries_context(user_text):
        return []
    context = user_text[len(CONTEXT_HEADER) :].rsplit("\n\nQuestion: ", 1)[0]
    return [re.sub(r"^\[\d+\] ", "", part) for part in re.split(r"\n\n(?=\[\d+\] )", context) if part.strip()]


def carries_context(user_text: str) -> bool:
    """Whether a user turn is a RAG prompt as rag_user_message writes it."""
    return user_text.startswith(CONTEXT_HEADER)


def edge_order(ranked: list[str]) -> list[str]:
    """Most relevant first and last, least relevant in the middle (against lost-in-the-middle).

    Ranks 1, 2, 3, 4, 5 are placed as 1, 3, 5, 4, 2.
    """
    return ranked[0::2] + ranked[1::2][::-1]


def rag_conversation(question: str, ranked_passages: list[str], system: str | None) -> list[dict]:
    """The RAG prompt of training data, the gate and serving: passages edge-ordered into the user turn."""
    return conversation(rag_user_message(question, edge_order(ranked_passages)), system)


def check_message(message: object, where: str) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
        raise InvalidMessages(f"{where} needs a role in {ROLES} and a string content")
    return {"role": message["role"], "content": message["content"]}


def check_messages(messages: object, field: str = "messages", min_count: int = 1) -> list[dict]:
    """{role, content} messages, copied without extra keys; raises InvalidMessages naming the field."""
    if not isinstance(messages, list) or len(messages) < min_count:
        plural = "message" if min_count == 1 else "messages"
        raise InvalidMessages(f"field {field!r} must be a list of at least {min_count} {plural}")
    return [check_message(message, f"{field}[{i}]") for i, message in enumerate(messages)]


def render_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of messages rendered with the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
    return list(encoded["input_ids"])


def cut_middle(tokenizer, text: str, remove: int, min_keep: int = 16) -> str:
    """`text` less about `remove` tokens from its middle, marked with CUT_MARK (edge-ordered passages are least
    relevant there; the question at the end is kept)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(ids) - remove
    if keep < min_keep:
        raise InvalidMessages(
            f"longer than max_length even with the user turn cut to {min_keep} tokens ({len(ids)} tokens there)"
        )
    head = keep // 2
    return tokenizer.decode(ids[:head]) + CUT_MARK + tokenizer.decode(ids[len(ids) - (keep - head) :])


def with_user_cut(tokenizer, messages: list[dict], remove: int) -> list[dict]:
    """The messages with `remove` tokens cut from the middle of the last user turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    cut = {"role": "user", "content": cut_middle(tokenizer, messages[last]["content"], remove)}
    return [*messages[:last], cut, *messages[last + 1 :]]


def reply_sequences(tokenizer, conversations: list[list[dict]], replies: list[str]) -> list[tuple[list[int], int]]:
    """Per conversation and its reply: the token ids of the prompt followed by the reply as the assistant turn
    through its end-of-turn token, and where the reply starts."""
    if len(replies) != len(conversations):
        raise ValueError(f"{len(replies)} replies for {len(conversations)} conversations")
    out = []
    for messages, reply in zip(conversations, replies):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)
        tail = full[len(prompt) :] if full.startswith(prompt) else reply + (tokenizer.eos_token or "")
        start = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = tokenizer(tail, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]  # not the template's text after the turn
        out.append((start + ids, len(start)))
    return out
