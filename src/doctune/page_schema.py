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
    """The user's JSON Schema (checked to be a valid schema of an object, its `$ref`s resolvable inside the file and its
    required keys among its properties), or the self-supervised one. A UTF-8 byte order mark is allowed."""
    if path is None:
        return SELF_SUPERVISED_SCHEMA
    from jsonschema.exceptions import SchemaError as InvalidSchema

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: no such schema file") from None
    except OSError as exc:  # a folder, no permission
        raise SchemaError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"{path}: not a JSON file ({exc})") from None
    kind = schema.get("type") if isinstance(schema, dict) else None
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind)  # ["object"], ["object", "null"]
    if not is_object or not isinstance(schema.get("properties"), dict):
        raise SchemaError(f"{path}: the schema must describe an object with properties (one key per field)")
    try:
        type(validator_for(schema)).check_schema(schema)
    except InvalidSchema as exc:
        raise SchemaError(f"{path}: not a valid JSON Schema: {exc.message}") from None
    required = schema.get("required", [])
    missing = [key for key in required if key not in schema["properties"]] if isinstance(required, list) else []
    if missing:
        raise SchemaError(
            f"{path}: required key(s) {', '.join(map(repr, missing))} not in properties: every field needs its entry "
            "in properties (the keys the model answers and the gate scores)"
        )
    unresolved = _unresolved_ref(schema)
    if unresolved:
        raise SchemaError(f"{path}: $ref {unresolved!r} cannot be resolved (only references inside the schema file are followed)")
    return schema


_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # JSON values, not schemas: a "$ref" there is data


def _unresolved_ref(schema: dict) -> str | None:
    """The first `$ref` of the schema that does not resolve inside it (another file, a URL, a pointer to nothing)."""
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    specification = specification_with(str(schema.get("$schema", "")), default=DRAFT202012)
    resource = specification.create_resource(schema)
    root = Registry().with_resource(resource.id() or "", resource).resolver(base_uri=resource.id() or "")

    def walk(node: object, resolver) -> str | None:
        if isinstance(node, list):
            return next((found for item in node if (found := walk(item, resolver))), None)
        if not isinstance(node, dict):
            return None
        if isinstance(specification.id_of(node), str):  # "$id" ("id" in draft 4): refs below are relative to it
            resolver = resolver.in_subresource(specification.create_resource(node))
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except Unresolvable:
                return ref
        return next((found for key, value in node.items() if key not in _DATA_KEYWORDS and (found := walk(value, resolver))),
                    None)  # fmt: skip

    return walk(schema, root)


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


JSON_WHITESPACE = " \t\n\r"  # RFC 8259's four; U+2028, a no-break space or a BOM are not
MAX_DEPTH = 64  # deepest nesting a reply may have (RFC 8259 lets a parser limit it; no page schema nests this deep)


def parse_reply(text: str) -> tuple[dict | None, str | None]:
    """The reply as a JSON object, or (None, why not). Strict: the whole reply (surrounding JSON whitespace aside) must
    be one JSON object; code fences, prose or other characters (a byte order mark, U+2028) before or after, trailing
    commas, single quotes, NaN/Infinity, duplicate keys, an array or a scalar, nesting deeper than MAX_DEPTH are
    invalid. Nothing is repaired."""
    stripped = text.strip(JSON_WHITESPACE)
    if not stripped.strip():
        return None, "empty reply"
    if stripped.startswith("```"):
        return None, "a code fence around the JSON"
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    try:
        value = decoder.decode(stripped)
    except _Duplicate as exc:
        return None, f"duplicate key {exc.args[0]!r}"
    except json.JSONDecodeError as exc:
        around = _around_object(stripped, decoder)
        if around is not None:
            if any(c.isprintable() and not c.isspace() for c in around):
                return None, "prose around the JSON"
            codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in around}))
            return None, f"characters that are not JSON whitespace around the JSON ({codes})"
        if exc.msg == "Extra data":
            return None, f"text after the JSON at char {exc.pos}"
        return None, f"not JSON: {exc.msg} at char {exc.pos}"
    except RecursionError:
        return None, f"not JSON this parser reads: nested deeper than {MAX_DEPTH} levels"
    except ValueError as exc:  # NaN / Infinity, an integer of more than 4300 digits
        return None, f"not JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"{_JSON_KIND.get(type(value), 'a JSON value')}, not an object"
    if _depth(value) > MAX_DEPTH:
        return None, f"not JSON this parser reads: nested deeper than {MAX_DEPTH} levels"
    return value, None


def _depth(value: object) -> int:
    """How deep arrays and objects nest in a parsed value (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def _around_object(text: str, decoder: json.JSONDecoder) -> str | None:
    """The text around the first JSON object inside `text` when there is something around it (a sentence, a fence);
    None when no object sits there."""
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict) and (start > 0 or end < len(text)):
            return text[:start] + text[end:]
        return None
    return None


def canonical_json(fields: dict, schema: dict) -> str:
    """The reply a page is trained on: the schema's keys in its order, then any others sorted; UTF-8 kept as text."""
    order = keys_of(schema)
    ordered = {key: fields[key] for key in order if key in fields}
    ordered |= {key: fields[key] for key in sorted(fields) if key not in ordered}
    return json.dumps(ordered, ensure_ascii=False)
