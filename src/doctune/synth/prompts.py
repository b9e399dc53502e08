"""What the synth stage asks LLM teachers, and the JSON schemas their replies must follow. (The texts a
tuned model is trained and served with are in doctune.chat.)"""

from __future__ import annotations

TEACHER_SYSTEM = "You write exam questions about technical documentation. You reply with JSON only."


def teacher_prompt(passage: str, section: str, low: int, high: int, language: str = "English") -> str:
    where = f' (from the section "{section}")' if section else ""
    return (
        f"Passage{where}:\n<<<\n{passage}\n>>>\n\n"
        f"Write between {low} and {high} questions a user of this documentation would ask that can be answered "
        'from this passage. Each question names its subject (no "it" or "this"; no pasted markup, no '
        "fill-in-the-blank). Each answer is a complete sentence grounded in the passage, stating what a number or "
        "name it gives is. Do not ask yes/no questions. Do not repeat the answer in the question. "
        f"Write questions and answers in {language}, the language of the passage. "
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
