"""Guardrails on one request: chosen once the route is known, run on its input, its answer or its stream.

A request with no guardrail pays for a few lookups in ``begin`` and nothing else (``x.guard`` stays None).
Only chat and completions requests are guarded (Messages, Responses and batch lines reach the pipeline as
chat); other endpoints ignore every guardrail setting.
"""

from __future__ import annotations

from typing import Any

import orjson

from appliance.accounts.usage import Tokens
from appliance.common.config import GuardrailsSettings
from appliance.common.sse import event_data
from appliance.core.catalog import Plan
from appliance.core.exchange import Exchange
from appliance.core.gateway import Gateway
from appliance.guardrails import pii, policy, texts
from appliance.guardrails.policy import BLOCKED, PASSED, PII, REDACTED, Guard
from appliance.guardrails.stream import StreamGuard
from appliance.providers.base import CHAT, COMPLETIONS, Call

GUARDED = frozenset((CHAT, COMPLETIONS))
_INPUT, _OUTPUT = ("input", "both"), ("output", "both")


def begin(gw: Gateway, x: Exchange, endpoint: str, body: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Choose the request's guardrails and check its input; returns the body to send (redacted or as it was).

    Raises 400 invalid_value for an unknown guardrail name, 400 guardrail_blocked for a refused input.
    """
    settings = gw.settings.guardrails
    header = x.controls.get(policy.HEADER)
    key = x.principal.guardrails if x.principal is not None else ()
    entry = gw.catalog.configured(plan)
    route = entry.guardrails if entry is not None else ()
    if policy.FIELD not in body and header is None and not key and not route and not settings.enforce:
        return body  # the common case: no guardrail anywhere
    names = policy.select(body, header, key, route, settings.enforce)
    if not names or endpoint not in GUARDED:
        return body
    x.guard = guard = Guard(names)
    if PII in names and settings.pii.on in _INPUT:
        body = _pii_input(guard, settings, endpoint, body)
        x.body = body  # the request log (and any stored body) keeps the redacted prompt, never the original
    return body


def _pii_input(guard: Guard, settings: GuardrailsSettings, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    kinds = settings.pii.kinds
    found: list[str] = []

    def redact(text: str) -> str:
        new, seen = pii.redact(text, kinds)
        found.extend(kind for kind in seen if kind not in found)
        return new

    redacted = texts.rewrite_request(endpoint, body, redact)
    if not found:
        guard.note(PII, PASSED)
        return body
    if settings.pii.mode == "block":
        guard.note(PII, BLOCKED)
        raise policy.blocked(PII, "request", found, param="prompt" if endpoint == COMPLETIONS else "messages")
    guard.note(PII, REDACTED)
    return redacted


# ------------------------------------------------------------------------------------------ whole answers


def checks_output(gw: Gateway, guard: Guard) -> bool:
    """Does any of the request's guardrails read the answer?"""
    return PII in guard.names and gw.settings.guardrails.pii.on in _OUTPUT


async def answer(gw: Gateway, call: Call, x: Exchange, data: dict[str, Any],
                 tokens: Tokens) -> tuple[dict[str, Any], Tokens]:
    """A whole answer through the output guardrails (changed in place where it is redacted), and the tokens
    used in all (a repair attempt adds its own)."""
    guard = x.guard
    assert guard is not None
    settings = gw.settings.guardrails
    if PII in guard.names and settings.pii.on in _OUTPUT:
        _pii_output(guard, settings, data)
    return data, tokens


def _pii_output(guard: Guard, settings: GuardrailsSettings, data: dict[str, Any]) -> None:
    found: list[str] = []

    def redact(text: str) -> str:
        new, seen = pii.redact(text, settings.pii.kinds)
        found.extend(kind for kind in seen if kind not in found)
        return new

    if settings.pii.mode == "block":
        for text in texts.answer_texts(data):
            redact(text)
        if found:
            guard.note(PII, BLOCKED)
            raise policy.blocked(PII, "answer", found)
    else:
        texts.rewrite_answer(data, redact)
    guard.note(PII, REDACTED if found else PASSED)


# ------------------------------------------------------------------------------------------ streams


def stream_guard(gw: Gateway, x: Exchange) -> StreamGuard | None:
    """The guard a streamed answer goes through; None when no guardrail reads the answer."""
    guard = x.guard
    if guard is None or not checks_output(gw, guard):
        return None
    settings = gw.settings.guardrails
    pii_out = PII in guard.names and settings.pii.on in _OUTPUT
    return StreamGuard(guard, kinds=settings.pii.kinds if pii_out else None, block=settings.pii.mode == "block",
                       collect=False)


def rewrite_events(guard: StreamGuard, events: list[bytes]) -> list[bytes]:
    """OpenAI SSE events with their chunks through ``guard``; an event it did not change goes out as it came."""
    out = []
    for event in events:
        data = event_data(event)
        if data and data != b"[DONE]" and b'"choices"' in data:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                chunk = None
            if isinstance(chunk, dict) and guard.chunk(chunk):
                event = b"data: " + orjson.dumps(chunk) + b"\n\n"
        out.append(event)
    return out


def end_stream(gw: Gateway, x: Exchange, guard: StreamGuard) -> list[dict[str, Any]]:
    """The chunks still held back, once the backend's stream ended; notes the outcomes. Raises a guardrail's
    error (it goes out as the stream's error event)."""
    assert x.guard is not None
    tail = guard.tail()
    if PII in x.guard.names and gw.settings.guardrails.pii.on in _OUTPUT:
        x.guard.note(PII, REDACTED if guard.found else PASSED)
    return tail


def tail_events(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
