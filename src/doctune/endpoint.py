"""An OpenAI-compatible chat API as synth's teacher and as a pairwise judge (synth's DPO pairs, the gate's
candidate-vs-champion verdicts): bounded retries with backoff, keys never logged, errors that name the URL."""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time

import requests

from doctune.config import EndpointConfig
from doctune.redact import protect, redact

# Client errors that can pass: a request timeout and rate limiting. Any other 4xx (401/403: the key; 400/404/422: the
# request) fails at once: repeating it cannot help, and repeats a refused key to the server.
RETRIED_4XX = frozenset({408, 429})


class EndpointError(RuntimeError):
    """The endpoint cannot be used at all (unreachable after retries, key refused...)."""


class ChatClient:
    """POST /chat/completions with bounded retries and backoff; errors name the URL, the role the endpoint plays
    (teacher, judge) and the config section that sets it."""

    def __init__(
        self, config: EndpointConfig, role: str = "teacher", section: str = "synth.endpoint", extra_body: dict | None = None
    ):
        self.config, self.role, self.section, self.extra_body = config, role, section, extra_body or {}
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        protect(config.api_key_env)  # whatever variable holds the key, its value is never logged
        key = os.environ.get(config.api_key_env, "")
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def response_format(self, schema: dict) -> dict | None:
        kind = self.config.response_format
        if kind == "json_object":
            return {"type": "json_object", "schema": schema}
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        return None

    def complete(self, system: str, user: str, schema: dict) -> str:
        return self.chat([{"role": "system", "content": system}, {"role": "user", "content": user}], schema)

    def chat(self, messages: list[dict], schema: dict | None = None) -> str:
        """The reply to `messages`, in JSON of `schema` where one is given (and the endpoint is asked for it)."""
        body = {
            **self.extra_body,
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if schema is not None and (fmt := self.response_format(schema)) is not None:
            body["response_format"] = fmt
        last, attempts = "", 0
        for attempt in range(self.config.max_retries + 1):
            attempts += 1
            try:
                response = self._session().post(self.url, json=body, headers=self.headers, timeout=self.config.timeout_s)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        last = f"HTTP 200 without a chat completion ({type(exc).__name__}: {exc})"
                else:
                    last = f"HTTP {response.status_code}"
                    if response.status_code not in RETRIED_4XX and 400 <= response.status_code < 500:
                        raise EndpointError(self._refused(response, attempts))  # retrying cannot help
                    last += self._body(response)
            if attempt < self.config.max_retries:
                time.sleep(min(8.0, 0.5 * 2**attempt) * (1 + random.random() * 0.25))
        raise EndpointError(redact(f"{self.role} endpoint {self.url} failed after {_attempts(attempts)}: {last}"))

    @staticmethod
    def _body(response: requests.Response) -> str:
        """': <body>' redacted and cut short, or '' for an empty body."""
        text = " ".join(redact(response.text).split())
        return f": {text[:200]}" + ("..." if len(text) > 200 else "") if text else ""

    def _refused(self, response: requests.Response, attempts: int) -> str:
        status, env = response.status_code, self.config.api_key_env
        if status in (401, 403):
            hint = f"check the key in ${env}" if "Authorization" in self.headers else f"no key sent: ${env} is not set"
            cause = f"HTTP {status} ({hint})"
        elif status == 404:
            cause = f"HTTP {status} (no chat completions there: check {self.section}.base_url, up to /v1)"
        else:
            cause = f"HTTP {status} (the request itself is wrong: check {self.section}'s model and response_format)"
        return redact(
            f"{self.role} endpoint {self.url} refused the request: {cause}, after {_attempts(attempts)}{self._body(response)}"
        )


def _attempts(n: int) -> str:
    return f"{n} attempt" + ("" if n == 1 else "s")


_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
JUDGE_SYSTEM = "You compare two answers to a question about documentation. You reply with JSON only."
JUDGE_SCHEMA = {"type": "object", "properties": {"better": {"type": "string", "enum": ["A", "B"]}}, "required": ["better"]}


def judge_prompt(question: str, first: str, second: str, reference: str | None = None) -> str:
    known = f"\n\nReference answer (written by a person):\n{reference}" if reference else ""
    return (
        f"{question}{known}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
        "Which answer is correct and supported by the documentation context in the question? "
        'Reply with JSON: {"better": "A"} or {"better": "B"}'
    )


class PairwiseJudge:
    """An LLM asked which of two answers is better, in both orders: a verdict stands only where the two orders agree
    (position bias cancels); a disagreement is a tie."""

    def __init__(self, client: ChatClient):
        self.client = client

    def prefers(self, question: str, first: str, second: str, reference: str | None = None) -> tuple[str | None, str]:
        """('A' | 'B' | None when the reply is unusable, the raw reply)."""
        content = self.client.complete(JUDGE_SYSTEM, judge_prompt(question, first, second, reference), JUDGE_SCHEMA)
        found = _JSON_OBJECT.search(content)  # the object itself, where a model wraps it in a code fence or prose
        try:
            better = json.loads(found.group(0) if found else content).get("better")
        except (json.JSONDecodeError, AttributeError):
            return None, content
        better = better.strip().upper() if isinstance(better, str) else None
        return (better if better in ("A", "B") else None), content

    def compare(self, question: str, a: str, b: str, reference: str | None = None) -> dict:
        """{"winner": "a" | "b" | "tie" | "unusable", "replies": [first order, swapped order]}. Identical answers
        tie without a request."""
        if " ".join(a.split()) == " ".join(b.split()):
            return {"winner": "tie", "replies": []}
        (first, raw1), (second, raw2) = self.prefers(question, a, b, reference), self.prefers(question, b, a, reference)
        if first is None or second is None:
            winner = "unusable"
        elif first == "A" and second == "B":
            winner = "a"
        elif first == "B" and second == "A":
            winner = "b"
        else:
            winner = "tie"  # each order preferred the answer shown first (or second): position, not content
        return {"winner": winner, "replies": [raw1, raw2]}
