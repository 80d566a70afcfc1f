"""One attempt against one backend: send, then relay the answer (whole or streamed) and account for it.

A failure before the first streamed byte propagates, so the pipeline may retry or fail over; after it,
the failure travels inside the stream and the attempt counts as answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.accounts.usage import Cost, StreamMeter, Tokens, estimate_prompt, from_extension, from_reply
from appliance.common.errors import GatewayError
from appliance.common.sse import DONE
from appliance.core import guarding
from appliance.core.exchange import (
    CLIENT_CLOSED,
    Exchange,
    Responder,
    compute_cost,
    ms,
    price_of,
    record,
    upstreams,
    usage_extras,
)
from appliance.core.gateway import Gateway
from appliance.providers.base import Call, answer_headers
from appliance.providers.transport import TransportError

# Turns the backend's parsed chat answer into the client's body (given its tokens, cost and latency).
Render = Callable[[Exchange, dict[str, Any], Tokens, Cost, float], Awaitable[bytes]]
# The tokens of a backend's parsed answer, given the body sent.
Count = Callable[[dict[str, Any], dict[str, Any]], Tokens]


async def answer_rendered(gw: Gateway, call: Call, x: Exchange, responder: Responder, render: Render | None, *,
                          upstream_headers: bool = False, count: Count = from_reply) -> tuple[bytes, Tokens]:
    """Send, answer whole in the client's shape, account; returns the backend's answer and tokens (for the cache).

    ``render`` None: the backend's answer is already in the client's shape and goes out as it came.
    ``count``: the tokens of the backend's parsed answer (default: chat usage, else an estimate).
    """
    reply = await upstreams(gw, x).providers[x.route.backend].send(call)  # type: ignore[union-attr]
    assert reply.data is not None  # providers parse every non-streaming answer
    compute_cost(gw, x)  # the backend's part is done: its share of the busy time is this attempt's
    tokens = count(reply.data, call.body)
    original = reply.body
    data = reply.data
    if x.guard is not None and render is not None and guarding.checks_output(gw, x.guard):
        data, tokens = await guarding.answer(gw, call, x, data, tokens)
    latency = time.perf_counter() - x.started
    cost = price_of(gw, x, tokens)
    body = original if render is None else await render(x, data, tokens, cost, latency)
    headers = {**(reply.headers if upstream_headers else {}), **x.response_headers(),
               "X-Appliance-Cost-Usd": f"{cost.total:.9f}", "X-Appliance-Latency-Ms": ms(latency),
               "X-Appliance-Overhead-Ms": ms(latency - reply.upstream_s)}
    if gw.settings.log.store_bodies:
        x.response_body = body
    # In the ledger (and the worker's journal) before the answer leaves: a worker killed in between
    # bills an answer its client may not get, never the other way round.
    record(gw, x, 200, tokens=tokens, cost=cost, overhead_s=latency - reply.upstream_s, ttft_s=latency)
    await responder.complete(200, headers, body)
    return original, tokens


async def answer(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> tuple[bytes, Tokens]:
    """OpenAI's own shape: the backend's answer, with cost and timings added to its usage."""
    return await answer_rendered(gw, call, x, responder, _openai_body, upstream_headers=True)


async def _openai_body(x: Exchange, data: dict[str, Any], tokens: Tokens, cost: Cost, latency: float) -> bytes:
    return _with_usage_extras(data, tokens, usage_extras(cost, x, latency))


def _with_usage_extras(data: dict[str, Any], tokens: Tokens, extras: dict[str, Any]) -> bytes:
    """The answer with cost and timings in its usage (which is added, marked estimated, when missing)."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        usage.update(extras)
    else:
        data["usage"] = {**tokens.as_usage(), **extras}
    return orjson.dumps(data)


async def relay_stream(gw: Gateway, call: Call, x: Exchange, responder: Responder,
                       first_token_s: float | None = None) -> GatewayError | None:
    """Relay a stream. Until its first event the attempt may still fail (and be retried elsewhere).

    Returns the failure that ended the stream after its first byte (the client got it as an error event;
    the caller counts it against the backend), or None.
    """
    stream_options = call.body.get("stream_options")
    client_wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    if not client_wants_usage:  # ask anyway, to account the tokens; the meter drops it again
        call.body["stream_options"] = {**(stream_options if isinstance(stream_options, dict) else {}),
                                       "include_usage": True}
    meter = StreamMeter(client_wants_usage=client_wants_usage, extras=lambda tokens: _extras(gw, x, meter, tokens))
    route = x.route
    assert route is not None
    # Only a request whose guardrails read the answer pays for parsing and re-rendering its chunks.
    guard = guarding.stream_guard(gw, x) if x.guard is not None else None
    async with upstreams(gw, x).providers[route.backend].stream(call) as upstream:
        overhead = time.perf_counter() - x.started - upstream.headers_after_s
        events = upstream.__aiter__()
        first = await first_events(events, first_token_s, route.backend)
        first_byte = time.perf_counter() - x.started
        await responder.start_stream({**upstream.headers, **x.response_headers(),
                                      "X-Appliance-Latency-Ms": ms(first_byte),
                                      "X-Appliance-Overhead-Ms": ms(overhead)})
        x.streaming = True
        failover = x.failover  # None unless this stream may go on elsewhere (core/failover.py)
        try:
            if failover is not None:  # from now on its events come through the failover's watch
                events = failover.watched(events, first, call)
                first = await anext(events, [])
            refused = None
            if guard is not None and first:
                first, refused = guarding.rewrite_events(guard, first)
            data = meter.feed(first) if first else b""
            if data:
                await responder.send(data)
            if refused is not None:
                raise refused
            async for chunk in events:
                if guard is not None:
                    chunk, refused = guarding.rewrite_events(guard, chunk)
                data = meter.feed(chunk)
                if data:
                    await responder.send(data)
                if refused is not None:
                    raise refused
            if guard is not None:
                tail = await guarding.end_stream(gw, x, call, guard)
                if tail:
                    await responder.send(guarding.tail_events(tail))
        except asyncio.CancelledError:
            record(gw, x, CLIENT_CLOSED, tokens=meter.final_tokens(call.body), error_code="client_closed",
                   overhead_s=overhead, ttft_s=_ttft(meter, x))
            raise
        except GatewayError as exc:
            # The status line is gone: the failure travels as an SSE error event, then [DONE].
            record(gw, x, 200, tokens=meter.final_tokens(call.body), error_code=exc.code,
                   overhead_s=overhead, ttft_s=_ttft(meter, x))
            await responder.end_stream(exc.sse_event(x.request_id) + DONE)
            return exc
        finally:
            if failover is not None:
                await events.aclose()  # type: ignore[attr-defined]  # a continuation's connection goes now
        last = meter.finish(call.body, {"failover": failover.note} if failover is not None and failover.note else None)
        error_code = None
        if meter.error is not None:
            error_code = str(meter.error.get("code") or meter.error.get("type") or "backend_error")
        record(gw, x, 200, tokens=meter.final_tokens(call.body), error_code=error_code, overhead_s=overhead,
               ttft_s=_ttft(meter, x))  # before the last bytes leave, as for whole answers
        await responder.end_stream(last)
    return None  # an error event of the backend's own passed through: its answer, not a failure to count


async def first_events(events: AsyncIterator[list[bytes]], timeout_s: float | None, backend: str) -> list[bytes]:
    """The stream's first events, within the first-token timeout; [] for a stream that ended at once."""
    try:
        if timeout_s is None:
            return await anext(events)
        return await asyncio.wait_for(anext(events), timeout_s)
    except StopAsyncIteration:
        return []
    except TimeoutError:
        raise GatewayError("backend_timeout", f"backend {backend!r} sent nothing within the first-token "
                           f"timeout ({timeout_s:g} s)") from None


def _extras(gw: Gateway, x: Exchange, meter: StreamMeter, tokens: Tokens) -> dict[str, Any]:
    """The final usage chunk's extras: the stream is ending, so the backend's share is charged up to now."""
    compute_cost(gw, x)
    return usage_extras(price_of(gw, x, tokens), x, _ttft(meter, x))


def _ttft(meter: StreamMeter, x: Exchange) -> float | None:
    return meter.first_event_at - x.started if meter.first_event_at else None




@dataclass(frozen=True, slots=True)
class Surface:
    """How an answer reaches the client: OpenAI's own shape, or translated (Messages, Responses)."""

    answer: Callable[[Gateway, Call, Exchange, Responder], Awaitable[tuple[bytes, Tokens]]]
    # Returns the failure that ended the stream after its first byte, or None (see relay_stream).
    stream: Callable[[Gateway, Call, Exchange, Responder, float | None], Awaitable[GatewayError | None]]
    cacheable: bool = True


OPENAI = Surface(answer, relay_stream)


# ------------------------------------------------------------------------------------------ as it comes


async def answer_as_is(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> tuple[bytes, Tokens]:
    """A JSON answer that is not OpenAI chat (rerank, score, moderations, images): the backend's body unchanged;
    its tokens as reported, else estimated; cost and timings in headers only."""
    return await answer_rendered(gw, call, x, responder, None, upstream_headers=True, count=from_extension)


async def relay_raw(gw: Gateway, call: Call, x: Exchange, responder: Responder,
                    first_token_s: float | None = None) -> GatewayError | None:
    """The backend's answer as it comes (audio, events, a multipart upload's answer), its content type kept.

    A JSON answer is read whole (its usage counted) and goes out unchanged; any other goes out chunk by chunk.
    A failure after the first byte cannot be told in a body of audio: the ledger notes it and the answer is
    cut off (no closing chunk), so the client sees an incomplete answer rather than a short one.
    """
    route = x.route
    assert route is not None
    try:
        async with upstreams(gw, x).providers[route.backend].exchange(call) as upstream:
            content_type = upstream.headers.get("Content-Type", "application/octet-stream")
            headers = {**answer_headers(upstream.headers), **x.response_headers()}
            overhead = time.perf_counter() - x.started - upstream.headers_after_s
            if content_type.split(";")[0].strip().lower() == "application/json":
                return await _whole(gw, call, x, responder, await upstream.read(), headers, overhead)
            chunks = upstream.chunks().__aiter__()
            first = await first_chunk(chunks, first_token_s, route.backend)
            first_byte = time.perf_counter() - x.started
            tokens = _raw_tokens(call)
            cost = price_of(gw, x, tokens)
            await responder.start_stream({**headers, "Content-Type": content_type,
                                          "X-Appliance-Latency-Ms": ms(first_byte),
                                          "X-Appliance-Overhead-Ms": ms(overhead),
                                          "X-Appliance-Cost-Usd": f"{cost.total:.9f}"})
            x.streaming = True
            try:
                if first:
                    await responder.send(first)
                async for chunk in chunks:
                    await responder.send(chunk)
            except asyncio.CancelledError:
                record(gw, x, CLIENT_CLOSED, tokens=tokens, error_code="client_closed", overhead_s=overhead,
                       ttft_s=first_byte)
                raise
            except (GatewayError, TransportError) as exc:
                code = exc.code if isinstance(exc, GatewayError) else "backend_unreachable"
                record(gw, x, 200, tokens=tokens, error_code=code, overhead_s=overhead, ttft_s=first_byte)
                raise
            record(gw, x, 200, tokens=tokens, cost=cost, overhead_s=overhead, ttft_s=first_byte)
            await responder.end_stream(b"")
            return None
    except GatewayError:
        failure = call.upload.failure if call.upload is not None else None  # type: ignore[attr-defined]
        if failure is not None:
            raise failure from None  # the upload, not the backend, stopped the body
        raise


async def _whole(gw: Gateway, call: Call, x: Exchange, responder: Responder, raw: bytes, headers: dict[str, str],
                 overhead: float) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    latency = time.perf_counter() - x.started
    tokens = from_extension(data if isinstance(data, dict) else None, call.body) if call.upload is None else (
        _reported_only(data))
    cost = price_of(gw, x, tokens)
    headers.update({"X-Appliance-Cost-Usd": f"{cost.total:.9f}", "X-Appliance-Latency-Ms": ms(latency),
                    "X-Appliance-Overhead-Ms": ms(overhead)})
    if gw.settings.log.store_bodies:
        x.response_body = raw
    record(gw, x, 200, tokens=tokens, cost=cost, overhead_s=overhead, ttft_s=latency)
    await responder.complete(200, headers, raw)


def _reported_only(data: Any) -> Tokens:
    """An upload's tokens: only what the backend reports (its audio or image cannot be estimated here)."""
    tokens = from_extension(data if isinstance(data, dict) else None, {})
    return Tokens() if tokens.estimated else tokens


def _raw_tokens(call: Call) -> Tokens:
    """A streamed answer's tokens: the request's text, estimated (speech: its input); none for an upload."""
    if call.upload is not None:
        return Tokens()
    return Tokens(estimate_prompt(call.body), 0, estimated=True)


async def first_chunk(chunks: AsyncIterator[bytes], timeout_s: float | None, backend: str) -> bytes:
    """The answer's first bytes, within the first-token timeout; b"" for an empty answer."""
    try:
        if timeout_s is None:
            return await anext(chunks)
        return await asyncio.wait_for(anext(chunks), timeout_s)
    except StopAsyncIteration:
        return b""
    except TimeoutError:
        raise GatewayError("backend_timeout", f"backend {backend!r} sent nothing within the first-token "
                           f"timeout ({timeout_s:g} s)") from None


async def raw_answer(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> tuple[bytes, Tokens]:
    await relay_raw(gw, call, x, responder)
    return b"", Tokens()  # never cached


# JSON answers as the backend wrote them (a stream, e.g. images with stream: true, as it comes).
AS_IS = Surface(answer_as_is, relay_raw, cacheable=False)
# Answers as they come, whatever they are: speech, and the answers to uploads.
RAW = Surface(raw_answer, relay_raw, cacheable=False)
