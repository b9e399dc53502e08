"""The fixed texts a tuned model is trained, evaluated and served with. Change them and every dataset changes."""

from __future__ import annotations

# Stored with the SFT dataset artifact and reused verbatim by eval and serving.
SYSTEM_PROMPT = (
    "You are a documentation assistant. Answer the question using only the documentation you were given. "
    "If the context does not contain the answer, say so instead of guessing."
)
ABSTENTION = "I cannot answer that from the provided documentation."


def rag_user_message(question: str, passages: list[str]) -> str:
    """A user turn that carries retrieved context, numbered in the order given."""
    context = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(passages, start=1))
    return f"Context:\n{context}\n\nQuestion: {question}"


def edge_order(ranked: list[str]) -> list[str]:
    """Most relevant first and last, least relevant in the middle (against lost-in-the-middle).

    Ranks 1, 2, 3, 4, 5 are placed as 1, 3, 5, 4, 2.
    """
    front = ranked[0::2]
    back = ranked[1::2]
    return front + back[::-1]


TEACHER_SYSTEM = "You write exam questions about technical documentation. You reply with JSON only."


def teacher_prompt(passage: str, section: str, low: int, high: int) -> str:
    where = f' (from the section "{section}")' if section else ""
    return (
        f"Passage{where}:\n<<<\n{passage}\n>>>\n\n"
        f"Write between {low} and {high} questions that can be answered only from this passage, each with a short "
        "answer taken from the passage. Do not ask yes/no questions. Do not repeat the answer in the question. "
        'Reply with JSON: {"questions": [{"question": "...", "answer": "..."}]}'
    )


QA_SCHEMA = {
    "type": "object",
    "properties": {
        "questions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"question": {"type": "string", "minLength": 8}, "answer": {"type": "string", "minLength": 1}},
                "required": ["question", "answer"],
            },
        }
    },
    "required": ["questions"],
}

JUDGE_SYSTEM = "You compare two answers to a question about documentation. You reply with JSON only."


def judge_prompt(question: str, first: str, second: str) -> str:
    return (
        f"{question}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
        "Which answer is correct and supported by the documentation context in the question? "
        'Reply with JSON: {"better": "A"} or {"better": "B"}'
    )


JUDGE_SCHEMA = {"type": "object", "properties": {"better": {"type": "string", "enum": ["A", "B"]}}, "required": ["better"]}
