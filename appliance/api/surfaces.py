"""Answers in other APIs' shapes over a chat-completions backend: Anthropic Messages and OpenAI Responses.

The pipeline routes, retries and accounts as for chat; a Surface only renders. Streams are parsed event
by event here (a translation has to read every chunk), fed to the surface's state machine, and the
usage the backend reports (or an estimate) is what the ledger records. An attempt that reaches an
Anthropic backend with a Messages request is not translated at all: api/messages/native.py passes it through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from appliance.accounts.auth import ANONYMOUS_ID
from appliance.accounts.usage import Cost, Tokens, estimate_prompt
from appliance.api.messages import native as messages_native
from appliance.api.messages import stream as messages_stream
from appliance.api.messages import translate as messages
from appliance.api.responses import items as responses_items
from appliance.api.responses import stream as responses_stream
from appliance.api.responses import translate as responses
from appliance.common.errors import GatewayError
from appliance.common.sse import json_objects
from appliance.core import guarding
from appliance.core.exchange import CLIENT_CLOSED, Exchange, Responder, ms, record, upstreams
from appliance.core.gateway import Gateway
from appliance.core.relay import Surface, answer_rendered, first_events
from appliance.providers.base import Call

log = logging.getLogger("appliance.api.surfaces")


class StreamTranslator(Protocol):
    """A chat-chunk -> client-event state machine for one streamed answer."""

    def start(self) -> bytes: ...

    def feed(self, chunk: dict[str, Any]) -> bytes: ...

    async def finish(self, usage: dict[str, Any] | None, failover: dict[str, Any] | None = None) -> bytes: ...

    async def error(self, err: GatewayError) -> bytes: ...

    @property
    def tokens(self) -> Tokens: ...


def _chunks(events: list[bytes]) -> Iterator[dict[str, Any]]:
    """The chat chunks in a batch of SSE events; a backend's error event raises (after those before it)."""
    for chunk in json_objects(events):
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise GatewayError("backend_error", str(error.get("message") or "the backend failed mid-stream"))
        yield chunk


async def relay_translated(gw: Gateway, call: Call, x: Exchange, responder: Responder, first_token_s: float | None,
                           translator: StreamTranslator) -> GatewayError | None:
    """Stream a chat answer to the client through ``translator``; returns the failure that ended it after
    its first byte, or None (as relay_stream does)."""
    call.body["stream_options"] = {"include_usage": True}
    route = x.route
    assert route is not None
    guard = guarding.stream_guard(gw, x) if x.guard is not None else None
    usage: dict[str, Any] | None = None
    first_at: float | None = None

    def translate(events: list[bytes]) -> tuple[bytes, GatewayError | None]:
        """The client's events for a batch, and the failure that ended it (what came before still goes out)."""
        nonlocal usage, first_at
        out = []
        try:
            for chunk in _chunks(events):
                if first_at is None:
                    first_at = time.perf_counter()
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                if guard is not None:
                    guard.chunk(chunk)
                out.append(translator.feed(chunk))
        except GatewayError as exc:
            return b"".join(out), exc
        return b"".join(out), None

    async with upstreams(gw, x).providers[route.backend].stream(call) as upstream:
        overhead = time.perf_counter() - x.started - upstream.headers_after_s
        events = upstream.__aiter__()
        first = await first_events(events, first_token_s, route.backend)
        await responder.start_stream({**x.response_headers(), "X-Appliance-Overhead-Ms": ms(overhead)})
        x.streaming = True
        ttft = None
        failover = x.failover  # None unless this stream may go on elsewhere (core/failover.py)
        try:
            if failover is not None:  # from now on its events come through the failover's watch
                events = failover.watched(events, first, call)
                first = await anext(events, [])
            data, failure = translate(first)
            await responder.send(translator.start() + data)
            if failure is not None:
                raise failure
            async for batch in events:
                data, failure = translate(batch)
                if data:
                    await responder.send(data)
                if failure is not None:
                    raise failure
            if guard is not None:
                tail = b"".join(translator.feed(chunk) for chunk in await guarding.end_stream(gw, x, call, guard))
                if tail:
                    await responder.send(tail)
        except asyncio.CancelledError:
            record(gw, x, CLIENT_CLOSED, tokens=translator.tokens, error_code="client_closed", overhead_s=overhead)
            raise
        except GatewayError as exc:
            last = await translator.error(exc)
            record(gw, x, 200, tokens=translator.tokens, error_code=exc.code, overhead_s=overhead)
            await responder.end_stream(last)
            return exc
        finally:
            if failover is not None:
                await events.aclose()  # type: ignore[attr-defined]  # a continuation's connection goes now
        ttft = first_at - x.started if first_at else None
        last = await translator.finish(usage, failover.note if failover is not None else None)
        record(gw, x, 200, tokens=translator.tokens, overhead_s=overhead, ttft_s=ttft)  # before the last bytes leave
        await responder.end_stream(last)
    return None


# ------------------------------------------------------------------------------------------ Messages


class _MessagesTranslator:
    def __init__(self, model: str, request: dict[str, Any], thinking: bool) -> None:
        self._stream = messages_stream.MessagesStream(model, request=request, thinking=thinking)

    def start(self) -> bytes:
        return self._stream.start()

    def feed(self, chunk: dict[str, Any]) -> bytes:
        return self._stream.feed(chunk)

    async def finish(self, usage: dict[str, Any] | None, failover: dict[str, Any] | None = None) -> bytes:
        return self._stream.finish(usage, appliance={"failover": failover} if failover is not None else None)

    async def error(self, err: GatewayError) -> bytes:
        return self._stream.error(err)

    @property
    def tokens(self) -> Tokens:
        return self._stream.tokens


def _passes_through(gw: Gateway, x: Exchange, translatable: bool) -> bool:
    """Does this attempt send the client's Messages body as is? Yes to a backend that speaks Messages, unless
    the request has guardrails (they read chat: it is translated there too, when it can be)."""
    assert x.route is not None
    if not messages_native.native(gw, x, x.route):
        return False
    if x.guard is None:
        return True
    if not translatable:
        raise GatewayError("unsupported", "Guardrails cannot check this Messages request: it holds content only "
                           "an Anthropic backend takes (a document block, say), which is passed through unread.",
                           param="guardrails")
    return False


def messages_surface(model: str, thinking: bool, body: dict[str, Any] | None = None, *,
                     translatable: bool = True) -> Surface:
    """Anthropic Messages answers for a request that named ``model``.

    ``body``: the client's Messages body, passed through to a backend that speaks Messages itself (a
    fallback to a chat backend is translated, attempt by attempt). ``translatable``: False when the chat body
    only stands in for it (what no chat backend could take), so it must pass through.
    """

    async def answer(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> tuple[bytes, Tokens]:
        assert x.route is not None
        if body is not None and _passes_through(gw, x, translatable):
            x.notes = None  # nothing is dropped on the way to a backend that speaks Messages
            return await messages_native.answer(gw, messages_native.native_call(body, call, x.route), x, responder,
                                                estimate_prompt(call.body))

        async def render(x: Exchange, chat: dict[str, Any], tokens: Tokens, cost: Cost, latency: float) -> bytes:
            return orjson.dumps(messages.message_response(chat, model=model, request=call.body, thinking=thinking))

        return await answer_rendered(gw, call, x, responder, render)

    async def stream(gw: Gateway, call: Call, x: Exchange, responder: Responder,
                     first_token_s: float | None) -> GatewayError | None:
        assert x.route is not None
        if body is not None and _passes_through(gw, x, translatable):
            x.notes = None
            return await messages_native.relay(gw, messages_native.native_call(body, call, x.route), x, responder,
                                               first_token_s, estimate_prompt(call.body))
        return await relay_translated(gw, call, x, responder, first_token_s,
                                      _MessagesTranslator(model, call.body, thinking))

    return Surface(answer, stream, cacheable=False)


# ------------------------------------------------------------------------------------------ Responses


# Spec §1.7: a failed (or unfinished) response is no base for a continuation.
CONTINUABLE = ("completed", "incomplete")


async def stored_response(gw: Gateway, response_id: str, key_id: str | None) -> dict[str, Any] | None:
    """A stored response this key may see (its own), or None."""
    row = await gw.responses.get(response_id, time.time())
    if row is None or (key_id is not None and row["key_id"] not in (None, key_id) and key_id != ANONYMOUS_ID):
        return None
    return row


@dataclass(slots=True)
class ResponsesTurn:
    """One POST /v1/responses: the chat body to send and what to store once it is answered."""

    request: dict[str, Any]
    chat: dict[str, Any]
    items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    response_id: str
    created_at: int
    key_id: str | None
    conversation: list[dict[str, Any]] | None = None  # once answered: the chain including this response

    async def store(self, gw: Gateway, response: dict[str, Any], *, continuable: bool = True) -> None:
        """Keep the response (unless ``store: false``); ``continuable``: a WebSocket may chain from it in memory."""
        conversation = [*self.history, *responses_items.history_items(self.items, response.get("output") or [])]
        if continuable:
            self.conversation = conversation
        if self.request.get("store") is False:
            return
        now = time.time()
        await gw.responses.save(response=response, key_id=self.key_id, input_items=self.items,
                                conversation=conversation, created_at=now,
                                expires_at=now + gw.settings.responses.keep_days * 86400)


async def responses_turn(gw: Gateway, body: dict[str, Any], key_id: str | None,
                         local: dict[str, list[dict[str, Any]]] | None = None) -> ResponsesTurn:
    """Validate a CreateResponse body and bring in its previous_response_id chain.

    ``local``: a WebSocket connection's own latest responses (found there first, stored or not).
    """
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if local is not None and isinstance(previous, str) and previous in local:
            history = local[previous]
        else:
            row = await stored_response(gw, previous, key_id) if isinstance(previous, str) else None
            if row is None:
                raise responses.previous_not_found(str(previous))
            if row["status"] not in CONTINUABLE:
                raise GatewayError("invalid_value", f"Previous response with id '{previous}' is {row['status']}; "
                                   "only completed or incomplete responses can be continued.",
                                   param="previous_response_id")
            history = row["conversation"]
    chat = responses.chat_request(body, history)
    if "guardrails" in body:  # the gateway's own field: the pipeline reads it (and never sends it on)
        chat["guardrails"] = body["guardrails"]
    return ResponsesTurn(body, chat, responses_items.input_items(body, history), history, responses.new_response_id(),
                         int(time.time()), key_id)


class _ResponsesTranslator:
    def __init__(self, gw: Gateway, turn: ResponsesTurn) -> None:
        self._gw = gw
        self._turn = turn
        self._stream = responses_stream.ResponsesStream(turn.request, response_id=turn.response_id,
                                                 created_at=turn.created_at)
        self._tokens = Tokens(estimate_prompt(turn.chat), 0, estimated=True)
        self._content = 0

    def start(self) -> bytes:
        return _sse(self._stream.start())

    def feed(self, chunk: dict[str, Any]) -> bytes:
        self._content += 1
        return _sse(self._stream.feed(chunk))

    async def finish(self, usage: dict[str, Any] | None, failover: dict[str, Any] | None = None) -> bytes:
        events = self._stream.finish(usage, appliance={"failover": failover} if failover is not None else None)
        if usage and isinstance(usage.get("prompt_tokens"), int):
            self._tokens = Tokens(usage["prompt_tokens"], usage.get("completion_tokens") or 0)
        else:
            self._tokens = Tokens(self._tokens.prompt, self._content, estimated=True)
        if self._stream.response is not None:
            await self._store(self._stream.response)  # before the final event goes out
        return _sse(events)

    async def error(self, err: GatewayError) -> bytes:
        events = self._stream.fail(err)
        if self._stream.response is not None:  # stored as failed: GET shows it, a continuation is refused
            await self._store(self._stream.response, continuable=False)
        return _sse(events)

    async def _store(self, response: dict[str, Any], *, continuable: bool = True) -> None:
        try:
            await self._turn.store(self._gw, response, continuable=continuable)
        except GatewayError as exc:  # the shared state is down: the answer streamed out whole, it is not kept
            log.warning("response %s not stored: %s", response.get("id"), exc.message)

    @property
    def tokens(self) -> Tokens:
        return self._tokens


def _sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(responses_stream.sse(event) for event in events)


def responses_surface(turn: ResponsesTurn) -> Surface:
    """Responses API answers (JSON or SSE events) for one turn, stored as the request asks."""

    async def answer(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> tuple[bytes, Tokens]:
        turn.items = guarding.stored_items(gw, x, turn.items)

        async def render(x: Exchange, chat: dict[str, Any], tokens: Tokens, cost: Cost, latency: float) -> bytes:
            response = responses.response_object(chat, request=turn.request, response_id=turn.response_id,
                                                 created_at=turn.created_at, completed_at=int(time.time()))
            await turn.store(gw, response)  # before the client sees it: any worker can continue from it
            return orjson.dumps(response)

        return await answer_rendered(gw, call, x, responder, render)

    async def stream(gw: Gateway, call: Call, x: Exchange, responder: Responder,
                     first_token_s: float | None) -> GatewayError | None:
        turn.items = guarding.stored_items(gw, x, turn.items)
        return await relay_translated(gw, call, x, responder, first_token_s, _ResponsesTranslator(gw, turn))

    return Surface(answer, stream, cacheable=False)
