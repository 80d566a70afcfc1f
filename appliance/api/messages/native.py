"""Messages requests to a backend that speaks Messages itself (``type = "anthropic"``): passed through.

The client's body goes upstream as sent, with the backend's model name and without the gateway's own
fields, so what a translation to chat would drop (``thinking``, ``metadata``, ``cache_control``,
``top_k``, fields of betas) still reaches the model. A whole answer is sent back byte for byte; a stream's
events are forwarded as they arrive, and only ``message_start``, ``message_delta`` and ``error`` events are
parsed, on the side, for the usage the ledger and limits count and for failures.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from appliance.accounts.usage import Tokens, estimate_text
from appliance.api.messages.request import _invalid, _is_int, _missing
from appliance.api.messages.stream import sse_event
from appliance.api.messages.translate import error_message, error_status, error_type
from appliance.common.errors import GatewayError
from appliance.common.sse import event_data
from appliance.core.catalog import Route
from appliance.core.exchange import (
    CLIENT_CLOSED,
    Exchange,
    Responder,
    allowed_routes,
    ms,
    record,
    upstream_key,
    upstreams,
)
from appliance.core.gateway import Gateway
from appliance.core.pipeline import GATEWAY_FIELDS, plan_for, upstream_body
from appliance.core.relay import answer_rendered, first_events
from appliance.providers.anthropic_translate import stream_error
from appliance.providers.base import COUNT_TOKENS, MESSAGES, Call

# The only events worth parsing: the rest (content_block_*, ping) are most of a stream and go as they are.
_WATCHED = frozenset((b"message_start", b"message_delta", b"message_stop", b"error"))

# The bytes around a delta's own text ("event: content_block_delta", the JSON keys): left out of the
# output estimate when a stream reports no usage.
_DELTA_OVERHEAD = 90
_CHARS_PER_TOKEN = 4


# Backends that speak Messages themselves. (OpenAI-compatible providers claim every endpoint and let the
# server answer 404, so ``supports`` cannot tell.)
NATIVE_KINDS = ("anthropic",)


def native(gw: Gateway, x: Exchange, route: Route) -> bool:
    """True when ``route``'s backend serves Messages itself, so a Messages body passes through."""
    return upstreams(gw, x).providers[route.backend].kind in NATIVE_KINDS


async def only_native(gw: Gateway, x: Exchange, body: dict[str, Any]) -> bool:
    """True when every target the key may reach for this Messages body speaks Messages itself."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return False
    await gw.wait_discovered()
    try:
        routes = allowed_routes(gw, x, plan_for(gw, x, body).routes)
    except GatewayError:
        return False  # the request fails on its own account; the translation's error is the one to report
    return all(native(gw, x, route) for route in routes)


def untranslated(body: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's view of a Messages body no chat backend could take (a PDF document, say) but an
    Anthropic one can: model, max_tokens, stream and the gateway's fields, with the whole prompt as one
    message, so limits and budgets estimate it (generously: the JSON is counted too)."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _missing("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 0:
        raise _invalid("max_tokens", "Input should be a non-negative integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream", "Input should be a valid boolean")
    prompt = orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")]).decode()
    out = {"model": body["model"], "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": prompt}]}
    out.update((name, body[name]) for name in GATEWAY_FIELDS if name in body)
    return out


def native_call(body: dict[str, Any], call: Call, route: Route) -> Call:
    """The client's Messages body addressed to ``route``'s backend model, with ``call``'s headers and limits."""
    return Call(MESSAGES, upstream_body(body, route), call.request_id, call.headers, limits=call.limits,
                api_key=call.api_key)


def tokens_of(usage: Any) -> Tokens | None:
    """Anthropic usage as the gateway's tokens: its ``input_tokens`` leave out cache reads and writes."""
    if not isinstance(usage, dict) or _count(usage.get("input_tokens")) is None:
        return None
    cached = _count(usage.get("cache_read_input_tokens")) or 0
    written = _count(usage.get("cache_creation_input_tokens")) or 0
    return Tokens(usage["input_tokens"] + cached + written, _count(usage.get("output_tokens")) or 0, cached=cached)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def answer(gw: Gateway, call: Call, x: Exchange, responder: Responder,
                 prompt_estimate: int) -> tuple[bytes, Tokens]:
    """A whole Message, as the backend sent it; its usage (else an estimate) is what is counted."""

    def count(data: dict[str, Any], body: dict[str, Any]) -> Tokens:
        found = tokens_of(data.get("usage"))
        if found is not None:
            return found
        text = "".join(str(block.get("text") or block.get("input") or "") for block in data.get("content") or ()
                       if isinstance(block, dict))
        return Tokens(prompt_estimate, estimate_text(text), estimated=True)

    return await answer_rendered(gw, call, x, responder, None, count=count)


class StreamWatch:
    """What a passed-through Messages stream reported: usage, the stop, an error event."""

    __slots__ = ("_output_chars", "_prompt_estimate", "error", "first_delta_at", "input", "output", "stopped")

    def __init__(self, prompt_estimate: int) -> None:
        self._prompt_estimate = prompt_estimate
        self._output_chars = 0
        self.input: Tokens | None = None  # from message_start, with cache reads and writes
        self.output: int | None = None
        self.first_delta_at: float | None = None
        self.error: GatewayError | None = None
        self.stopped = False

    def see(self, events: list[bytes]) -> None:
        for event in events:
            name = _name(event)
            if name not in _WATCHED:
                if name == b"content_block_delta":
                    if self.first_delta_at is None:
                        self.first_delta_at = time.perf_counter()
                    self._output_chars += max(len(event) - _DELTA_OVERHEAD, 1)
                continue
            data = _data(event)
            kind = data.get("type")
            if kind == "message_start":
                message = data.get("message") if isinstance(data.get("message"), dict) else {}
                self.input = tokens_of(message.get("usage"))
            elif kind == "message_delta":
                usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
                self.output = _count(usage.get("output_tokens"))
                if _count(usage.get("input_tokens")):  # cumulative counts; some proxies send them only here
                    self.input = tokens_of(usage)
            elif kind == "message_stop":
                self.stopped = True
            elif kind == "error":
                error = data.get("error") if isinstance(data.get("error"), dict) else {}
                self.error = stream_error(error)

    def tokens(self) -> Tokens:
        if self.input is not None and self.output is not None:
            return Tokens(self.input.prompt, self.output, cached=self.input.cached)
        # Usage is missing or cut short: the output is estimated from the size of its deltas.
        prompt = self.input.prompt if self.input is not None else self._prompt_estimate
        return Tokens(prompt, -(-self._output_chars // _CHARS_PER_TOKEN), estimated=True,
                      cached=self.input.cached if self.input is not None else 0)


def _name(event: bytes) -> bytes | None:
    """The ``event:`` name of an SSE event (Anthropic puts it on the first line)."""
    if not event.startswith(b"event:"):
        return None
    return event[6:event.find(b"\n")].strip()


def _data(event: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(event_data(event) or b"null")
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def error_event(err: GatewayError) -> bytes:
    """A failure after the stream began: an ``event: error`` (the SDK raises), no message_stop."""
    return sse_event("error", {"type": "error", "error": {"type": error_type(error_status(err, answered=True)),
                                                          "message": error_message(err)}})


async def relay(gw: Gateway, call: Call, x: Exchange, responder: Responder, first_token_s: float | None,
                prompt_estimate: int) -> GatewayError | None:
    """Forward a Messages stream. Until its first event the attempt may still fail and be retried elsewhere.

    Returns the failure that ended the stream after its first byte, or None (as relay_stream does).
    """
    route = x.route
    assert route is not None
    watch = StreamWatch(prompt_estimate)
    async with upstreams(gw, x).providers[route.backend].stream(call) as upstream:
        overhead = time.perf_counter() - x.started - upstream.headers_after_s
        events = upstream.__aiter__()
        first = await first_events(events, first_token_s, route.backend)
        latency = time.perf_counter() - x.started
        await responder.start_stream({**x.response_headers(), "X-Appliance-Latency-Ms": ms(latency),
                                      "X-Appliance-Overhead-Ms": ms(overhead)})
        x.streaming = True
        try:
            batch = first
            while True:
                if batch:
                    watch.see(batch)
                    if watch.stopped:  # message_stop is in this batch: in the ledger before it leaves
                        record(gw, x, 200, tokens=watch.tokens(), error_code=watch.error.code if watch.error else None,
                               overhead_s=overhead, ttft_s=_ttft(watch, x))
                    await responder.send(b"".join(batch))
                batch = await anext(events, None)
                if batch is None:
                    break
            if not watch.stopped and watch.error is None:
                raise GatewayError("backend_error", f"backend {route.backend!r} ended the stream before message_stop")
        except asyncio.CancelledError:
            record(gw, x, CLIENT_CLOSED, tokens=watch.tokens(), error_code="client_closed", overhead_s=overhead,
                   ttft_s=_ttft(watch, x))
            raise
        except GatewayError as exc:
            record(gw, x, 200, tokens=watch.tokens(), error_code=exc.code, overhead_s=overhead, ttft_s=_ttft(watch, x))
            await responder.end_stream(error_event(exc))
            return exc
        await responder.end_stream(b"")
    record(gw, x, 200, tokens=watch.tokens(), error_code=watch.error.code if watch.error else None,
           overhead_s=overhead, ttft_s=_ttft(watch, x))
    return None  # the backend's own error event passed through: its answer, not a failure to count


def _ttft(watch: StreamWatch, x: Exchange) -> float | None:
    return watch.first_delta_at - x.started if watch.first_delta_at else None


async def count_tokens(gw: Gateway, body: dict[str, Any], x: Exchange, routes: tuple[Route, ...]) -> bytes | None:
    """A count_tokens answer from the first Anthropic backend among ``routes`` that has the endpoint; None: none has."""
    for route in routes:
        if not native(gw, x, route):
            continue
        call = Call(COUNT_TOKENS, upstream_body(body, route), x.upstream_id, x.headers,
                    api_key=upstream_key(x, route.backend))
        try:
            reply = await upstreams(gw, x).providers[route.backend].send(call)
        except GatewayError as exc:
            if exc.status in (404, 405, 501) and exc.code != "model_not_found":
                continue  # a Messages proxy without count_tokens: the estimate stands in
            raise
        if _count(reply.data.get("input_tokens") if reply.data else None) is not None:
            return reply.body
    return None
