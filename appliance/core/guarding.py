"""Guardrails on one request: chosen once the route is known, run on its input, its answer or its stream.

A request with no guardrail pays for a few lookups in ``begin`` and nothing else (``x.guard`` stays None).
Only chat and completions requests are guarded (Messages, Responses and batch lines reach the pipeline as
chat); other endpoints ignore every guardrail setting.

Input: pii (redact or block), then content_moderation. A whole answer: schema_validation (with one repair
attempt), content_moderation, then pii. A stream: pii as it passes; schema_validation and content_moderation
once it ended (a failure then is the stream's error event: its text already went out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import orjson

from appliance.accounts.usage import Tokens, from_reply
from appliance.common.config import GuardrailsSettings
from appliance.common.errors import GatewayError
from appliance.common.sse import event_data
from appliance.core import side_calls
from appliance.core.catalog import Plan
from appliance.core.exchange import Exchange, upstreams
from appliance.core.gateway import Gateway
from appliance.guardrails import moderation, pii, policy, schema, texts
from appliance.guardrails.policy import BLOCKED, FAILED, MODERATION, PASSED, PII, REDACTED, SCHEMA, Guard
from appliance.guardrails.stream import StreamGuard
from appliance.providers.base import CHAT, COMPLETIONS, MODERATIONS, Call

GUARDED = frozenset((CHAT, COMPLETIONS))
_INPUT, _OUTPUT = ("input", "both"), ("output", "both")


def begin(gw: Gateway, x: Exchange, endpoint: str, body: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Choose the request's guardrails; returns the body to send (its input is checked by ``check_input``).

    Raises 400 invalid_value for an unknown guardrail name, or for schema_validation without a schema.
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
    if SCHEMA in names and schema.schema_of(body, settings.schema_validation.json_schema) is None:
        raise GatewayError("invalid_value", "The schema_validation guardrail needs a JSON Schema: send "
                           "response_format {\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}, or set "
                           "[guardrails.schema_validation] schema.", param="response_format")
    x.guard = Guard(names)
    return body


async def check_input(gw: Gateway, x: Exchange, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request's input through its guardrails: the body to send (redacted, or as it was).

    Raises 400 guardrail_blocked for a refused input.
    """
    guard = x.guard
    assert guard is not None
    settings = gw.settings.guardrails
    if PII in guard.names and settings.pii.on in _INPUT:
        redacted = _pii_input(guard, settings, endpoint, body)
        if redacted is not body:
            x.body = body = redacted  # the request log (and a stored body) keeps the redacted prompt only
    if MODERATION in guard.names and settings.content_moderation.on in _INPUT:
        await _moderate(gw, x, guard, list(texts.request_texts(endpoint, body)), "request",
                        "prompt" if endpoint == COMPLETIONS else "messages")
    return body


def _pii_input(guard: Guard, settings: GuardrailsSettings, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    found: list[str] = []
    redacted = texts.rewrite_request(endpoint, body, _redactor(settings, found))
    if not found:
        guard.note(PII, PASSED)
        return body
    if settings.pii.mode == "block":
        guard.note(PII, BLOCKED)
        raise policy.blocked(PII, "request", found, param="prompt" if endpoint == COMPLETIONS else "messages")
    guard.note(PII, REDACTED)
    return redacted


def _redactor(settings: GuardrailsSettings, found: list[str]) -> texts.Rewrite:
    """Redacts a text with the configured kinds, adding the kinds it found to ``found``."""
    kinds = settings.pii.kinds

    def redact(text: str) -> str:
        new, seen = pii.redact(text, kinds)
        found.extend(kind for kind in seen if kind not in found)
        return new

    return redact


async def _moderate(gw: Gateway, x: Exchange, guard: Guard, checked: list[str], what: str,
                    param: str | None = None) -> None:
    """content_moderation on ``checked``: the configured categories, then the moderation model (if any)."""
    found = gw.moderator.flagged(checked)
    model = gw.settings.guardrails.content_moderation.model
    if not found and model is not None and any(checked):
        try:
            found = await _model_verdict(gw, x, model, [text for text in checked if text])
        except GatewayError:
            guard.note(MODERATION, FAILED)
            raise
    if found:
        guard.note(MODERATION, BLOCKED)
        raise policy.blocked(MODERATION, what, found, param=param)
    guard.note(MODERATION, PASSED)


async def _model_verdict(gw: Gateway, x: Exchange, model: str, checked: list[str]) -> list[str]:
    """The categories the moderation model flags, asked through the gateway's routing (its own call: no key's
    limits, no ledger row). Any failure is the backend's (a 5xx), never the client's."""
    return await side_calls.ask(
        gw.catalog, upstreams(gw, x).providers, model, MODERATIONS, request_id=x.upstream_id,
        timeout_s=gw.settings.guardrails.content_moderation.timeout_s, what="the moderation model",
        body=lambda route: {"model": route.upstream_model, "input": checked},
        read=lambda _, reply: moderation.model_verdict(reply.data))


def stored_items(gw: Gateway, x: Exchange, items: list[Any]) -> list[Any]:
    """Responses input items to store: redacted as the prompt was, so the store never keeps what the backend
    was not allowed to see."""
    guard = x.guard
    if guard is None or guard.outcomes.get(PII) != REDACTED:
        return items
    return texts.rewrite_items(items, _redactor(gw.settings.guardrails, []))


# ------------------------------------------------------------------------------------------ whole answers


def checks_output(gw: Gateway, guard: Guard) -> bool:
    """Does any of the request's guardrails read the answer?"""
    settings = gw.settings.guardrails
    return SCHEMA in guard.names or (PII in guard.names and settings.pii.on in _OUTPUT) or (
        MODERATION in guard.names and settings.content_moderation.on in _OUTPUT)


async def answer(gw: Gateway, call: Call, x: Exchange, data: dict[str, Any],
                 tokens: Tokens) -> tuple[dict[str, Any], Tokens]:
    """A whole answer through the output guardrails (changed in place where it is redacted), and the tokens
    used in all (a repair attempt adds its own)."""
    guard = x.guard
    assert guard is not None
    settings = gw.settings.guardrails
    if SCHEMA in guard.names:
        data, tokens = await _validated(gw, call, x, guard, data, tokens)
    if MODERATION in guard.names and settings.content_moderation.on in _OUTPUT:
        await _moderate(gw, x, guard, list(texts.answer_texts(data)), "answer")
    if PII in guard.names and settings.pii.on in _OUTPUT:
        _pii_output(guard, settings, data)
    return data, tokens


async def _validated(gw: Gateway, call: Call, x: Exchange, guard: Guard, data: dict[str, Any],
                     tokens: Tokens) -> tuple[dict[str, Any], Tokens]:
    """The answer if it matches the schema, else the answer to one repair attempt if that does; else 422."""
    wanted = schema.schema_of(call.body, gw.settings.guardrails.schema_validation.json_schema)
    assert wanted is not None  # begin() refused a request without one
    text = texts.answer_text(data)
    found = schema.problem(text, wanted)
    if found is not None and call.endpoint == CHAT and gw.settings.guardrails.schema_validation.repair:
        body = {**call.body, "messages": schema.repair_messages(call.body.get("messages") or [], text, found)}
        repair = dataclasses.replace(call, body=body)
        reply = await upstreams(gw, x).providers[x.route.backend].send(repair)  # type: ignore[union-attr]
        assert reply.data is not None
        more = from_reply(reply.data, body)
        tokens = Tokens((tokens.prompt or 0) + (more.prompt or 0), (tokens.completion or 0) + (more.completion or 0),
                        estimated=tokens.estimated or more.estimated, cached=tokens.cached + more.cached)
        data = reply.data
        if isinstance(data.get("usage"), dict):  # the client pays for both attempts: its usage says so
            data["usage"] = {**data["usage"], **tokens.as_usage()}
        found = schema.problem(texts.answer_text(data), wanted)
    if found is not None:
        guard.note(SCHEMA, FAILED)
        raise GatewayError("guardrail_failed", f"Guardrail 'schema_validation' failed: {found}")
    guard.note(SCHEMA, PASSED)
    return data, tokens


def _pii_output(guard: Guard, settings: GuardrailsSettings, data: dict[str, Any]) -> None:
    found: list[str] = []
    redact = _redactor(settings, found)
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
    moderated = MODERATION in guard.names and settings.content_moderation.on in _OUTPUT
    return StreamGuard(guard, kinds=settings.pii.kinds if pii_out else None, block=settings.pii.mode == "block",
                       collect=SCHEMA in guard.names or moderated,
                       moderate=gw.moderator.flagged if moderated and gw.moderator else None)


def rewrite_events(guard: StreamGuard, events: list[bytes]) -> tuple[list[bytes], GatewayError | None]:
    """OpenAI SSE events with their chunks through ``guard`` (an event it did not change goes out as it came),
    and the guardrail error that stopped them: the events before the one refused still go out."""
    out = []
    for event in events:
        data = event_data(event)
        if data and data != b"[DONE]" and b'"choices"' in data:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                chunk = None
            try:
                changed = isinstance(chunk, dict) and guard.chunk(chunk)
            except GatewayError as exc:
                return out, exc
            if changed:
                event = b"data: " + orjson.dumps(chunk) + b"\n\n"
        out.append(event)
    return out, None


async def end_stream(gw: Gateway, x: Exchange, call: Call, guard: StreamGuard) -> list[dict[str, Any]]:
    """The chunks still held back, once the backend's stream ended, after the checks made on the whole text.

    Raises a guardrail's error: it goes out as the stream's error event (what was sent stays sent).
    """
    assert x.guard is not None
    settings = gw.settings.guardrails
    tail = guard.tail()
    if PII in x.guard.names and settings.pii.on in _OUTPUT:
        x.guard.note(PII, REDACTED if guard.found else PASSED)
    if SCHEMA in x.guard.names:
        wanted = schema.schema_of(call.body, settings.schema_validation.json_schema)
        found = schema.problem(guard.text, wanted) if wanted is not None else None
        if found is not None:
            x.guard.note(SCHEMA, FAILED)
            raise GatewayError("guardrail_failed", f"Guardrail 'schema_validation' failed: {found}")
        x.guard.note(SCHEMA, PASSED)
    if MODERATION in x.guard.names and settings.content_moderation.on in _OUTPUT:
        await _moderate(gw, x, x.guard, [guard.text], "answer")
    return tail


def tail_events(chunks: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)
