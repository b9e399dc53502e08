"""What the synth stage asks LLM teachers and judges, and the JSON schemas their replies must follow. (The texts a
tuned model is trained and served with are in doctune.chat.)"""

from __future__ import annotations

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
