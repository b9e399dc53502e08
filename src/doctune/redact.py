"""One redaction step for every string that leaves the process: tags, params, logged text, printed errors, raw artifacts.

The values of the environment variables that hold secrets (the teacher's API key, MLflow and object-store credentials,
the Secrets `cluster.secrets` exposes to pods) are replaced by `[redacted:NAME]`; a password embedded in a URI
(`scheme://user:password@host`) becomes `***`; so does the token after `Bearer `. Values are read from the environment
at each call (a key set after `configure` is still caught); the compiled pattern is cached while they do not change.
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from doctune.config import RunConfig

# Variables MLflow, object-store clients and the Hugging Face hub read credentials from, whatever the config says.
STANDARD_SECRETS = frozenset(
    {
        "DOCTUNE_TEACHER_API_KEY",
        "DOCTUNE_JUDGE_API_KEY",
        "DOCTUNE_SERVE_API_KEY",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_SAS_TOKEN",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "OPENAI_API_KEY",
    }
)
# Identities, not secrets: replacing a user name (often a common word, even "doctune") would garble every message
# that contains it, and says nothing an attacker could use alone.
NOT_SECRET = frozenset({"MLFLOW_TRACKING_USERNAME"})
MIN_LENGTH = 4  # shorter values would replace ordinary fragments of text

_URI_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+@")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)[A-Za-z0-9._~+/=\-]{8,}")

_lock = threading.Lock()
_names: frozenset[str] = STANDARD_SECRETS
_cached: tuple[tuple[tuple[str, str], ...], re.Pattern[str] | None, dict[str, str]] = ((), None, {})


def secret_names(config: RunConfig | None = None) -> frozenset[str]:
    """Names of the environment variables whose values are secrets for this config (the standard ones included)."""
    names = set(STANDARD_SECRETS)
    if config is not None:
        names.add(config.synth.endpoint.api_key_env)
        for secret in config.cluster.secrets:
            names.update(secret.env.values())
    return frozenset(names - NOT_SECRET)


def configure(config: RunConfig | None = None) -> None:
    """Add this config's secret variables to the process-wide set (names only: values are read at each call).

    The set only grows: a second config in the same process never makes an earlier one's secrets printable.
    """
    global _names
    with _lock:
        _names = _names | secret_names(config)


def protect(*names: str) -> None:
    """Add variables by name (a component that reads a secret itself, e.g. the teacher client)."""
    global _names
    with _lock:
        _names = _names | (frozenset(n for n in names if n) - NOT_SECRET)


def _pattern() -> tuple[re.Pattern[str] | None, dict[str, str]]:
    global _cached
    found: dict[str, str] = {}
    for name in sorted(_names):
        value = os.environ.get(name)
        if not value:
            continue
        for candidate in (value, value.strip()):
            if len(candidate) >= MIN_LENGTH:
                found.setdefault(candidate, name)
    key = tuple(sorted(found.items()))
    cached_key, pattern, names = _cached
    if key != cached_key:
        # Longest first: a value that contains another is replaced whole.
        values = sorted(found, key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, values))) if values else None
        names = dict(found)
        _cached = (key, pattern, names)
    return pattern, names


def redact(text: str) -> str:
    """`text` with every current secret value, URI password and bearer token replaced."""
    if not isinstance(text, str):
        text = str(text)
    if not text:
        return text
    pattern, names = _pattern()
    if pattern is not None:
        text = pattern.sub(lambda m: f"[redacted:{names[m.group(0)]}]", text)
    if "://" in text:
        text = _URI_CREDENTIALS.sub(r"\g<head>***@", text)
    if "Bearer" in text:
        text = _BEARER.sub(r"\g<head>***", text)
    return text


def redact_obj(value: Any) -> Any:
    """A JSON-like value with `redact` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_obj(k): redact_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_obj(v) for v in value]
    return value


def scrub(value: Any, pii: list[re.Pattern[str]]) -> Any:
    """`redact_obj`, and every match of the `pii` patterns (e-mail addresses, ...) replaced by [redacted:pii]: what
    text people typed goes through before it is written (serving logs, labels)."""
    value = redact_obj(value)
    if isinstance(value, str):
        for pattern in pii:
            value = pattern.sub("[redacted:pii]", value)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, pii) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, pii) for v in value]
    return value


__all__ = ["configure", "protect", "redact", "redact_obj", "scrub", "secret_names"]
