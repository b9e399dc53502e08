"""The page track's JSON schema: the self-supervised default, loading a user's, checking a record against it, and the
one canonical JSON text of a page's fields (key order from the schema, so key names and order never vary).

Shared by the pages stage (labels), page SFT (the reply trained on), page quantize and the page gate (strict parsing of
a reply, conformance).
"""

from __future__ import annotations

import json
from pathlib import Path

# Fields derived from a digital page's text layer (doctune.pages.selfsup): any PDF gets labels without a person.
SELF_SUPERVISED_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "page",
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "section", "running_header", "page_number", "first_paragraph", "table_rows"],
    "properties": {
        "title": {"type": ["string", "null"], "description": "the page's largest heading"},
        "section": {"type": ["string", "null"], "description": "the section number of the first numbered heading"},
        "running_header": {"type": ["string", "null"], "description": "text repeated at the top of the document's pages"},
        "page_number": {"type": ["string", "null"], "description": "the printed page number (header or footer)"},
        "first_paragraph": {"type": ["string", "null"], "description": "the first body paragraph, up to 300 characters"},
        "table_rows": {
            "type": "array",
            "description": "rows of the page's first table, cells as text",
            "items": {"type": "array", "items": {"type": "string"}},
        },
    },
}


class SchemaError(ValueError):
    """A JSON Schema file that cannot be used; the message names the file and the problem."""


def load_schema(path: Path | None) -> dict:
    """The user's JSON Schema (checked to be a valid schema of an object), or the self-supervised one."""
    if path is None:
        return SELF_SUPERVISED_SCHEMA
    from jsonschema.exceptions import SchemaError as InvalidSchema

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such schema file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"), dict):
        raise SchemaError(f"{path}: the schema must describe an object with properties (one key per field)")
    try:
        type(validator_for(schema)).check_schema(schema)
    except InvalidSchema as exc:
        raise SchemaError(f"{path}: not a valid JSON Schema: {exc.message}") from None
    return schema


def validator_for(schema: dict):
    from jsonschema import Draft202012Validator, validators

    cls = validators.validator_for(schema, default=Draft202012Validator)
    return cls(schema)


def keys_of(schema: dict) -> list[str]:
    """The fields, in the schema's order."""
    return list(schema.get("properties", {}))


def violations(value: object, schema: dict) -> list[str]:
    """Why `value` does not follow the schema, one line per problem naming the key ([] when it does)."""
    problems = []
    for error in sorted(validator_for(schema).iter_errors(value), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in error.absolute_path) or "(the object)"
        problems.append(f"{where}: {error.message}")
    return problems


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_JSON_KIND = {list: "a JSON array", str: "a JSON string", bool: "a JSON boolean", int: "a JSON number", float: "a JSON number",
              type(None): "JSON null"}  # fmt: skip


def parse_reply(text: str) -> tuple[dict | None, str | None]:
    """The reply as a JSON object, or (None, why not). Strict: the whole reply (surrounding whitespace aside) must be
    one JSON object; code fences, prose before or after, trailing commas, single quotes, NaN/Infinity, duplicate keys,
    an array or a scalar are invalid. Nothing is repaired."""
    stripped = text.strip()
    if not stripped:
        return None, "empty reply"
    if stripped.startswith("```"):
        return None, "a code fence around the JSON"
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    try:
        value = decoder.decode(stripped)
    except _Duplicate as exc:
        return None, f"duplicate key {exc.args[0]!r}"
    except json.JSONDecodeError as exc:
        if _embedded_object(stripped, decoder):
            return None, "prose around the JSON"
        if exc.msg == "Extra data":
            return None, f"text after the JSON at char {exc.pos}"
        return None, f"not JSON: {exc.msg} at char {exc.pos}"
    except ValueError as exc:  # NaN / Infinity
        return None, f"not JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"{_JSON_KIND.get(type(value), 'a JSON value')}, not an object"
    return value, None


def _embedded_object(text: str, decoder: json.JSONDecoder) -> bool:
    """Whether a JSON object sits inside the text with something else around it (a sentence, a fence)."""
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return isinstance(value, dict) and (start > 0 or end < len(text))
    return False


def canonical_json(fields: dict, schema: dict) -> str:
    """The reply a page is trained on: the schema's keys in its order, then any others sorted; UTF-8 kept as text."""
    order = keys_of(schema)
    ordered = {key: fields[key] for key in order if key in fields}
    ordered |= {key: fields[key] for key in sorted(fields) if key not in ordered}
    return json.dumps(ordered, ensure_ascii=False)
