"""JSON replies checked against a flat schema of key types: the capability probes the gate scores and the
structured-output rehearsal chats synth verifies before training on them use one check."""

from __future__ import annotations

import json
import re


def json_object(text: str, only: bool = False) -> dict | None:
    """The JSON object a reply holds (code fences allowed; surrounding prose too unless `only`), or None."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    embedded = body[body.find("{") : body.rfind("}") + 1] if "{" in body and not only else ""
    for candidate in (body, embedded):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def schema_match(value: dict | None, schema: dict[str, str]) -> bool:
    """Exactly the schema's keys, each of its type (booleans are not integers)."""
    if value is None or set(value) != set(schema):
        return False
    for key, kind in schema.items():
        item = value[key]
        if isinstance(item, bool) and kind != "boolean":
            return False
        if not isinstance(item, JSON_TYPES[kind]):
            return False
    return True


_FENCE_OPEN = re.compile(r"^\s*```(?:json)?[ \t]*\n?")
_FENCE_CLOSE = re.compile(r"\s*```")  # matched at a position: no ^


def leading_json(text: str) -> tuple[dict, str] | None:
    """The JSON object a reply starts with (inside a code fence or bare) and the reply cut right after it (and
    after the fence's close), dropping what follows; None when the reply does not start with one."""
    fence = _FENCE_OPEN.match(text)
    start = fence.end() if fence else 0
    start += len(text[start:]) - len(text[start:].lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if fence:
        close = _FENCE_CLOSE.match(text, end)
        if close is None:
            return None  # an unclosed fence: the object may be cut off
        end = close.end()
    return value, text[:end].strip()
