"""Mid-stream failover: a chat stream whose backend fails after its first token goes on on another target.

The relays (core/relay.py, api/surfaces.py) read their upstream events through ``Failover.watched`` when the
pipeline gave the request one (a chat stream, ``n`` 1, the switch on, another target in its plan). While the
backend streams well its batches pass as they came: kept by reference (read only if it fails), each wait for
the next one bounded by the stall time. When it fails (its connection reset or closed before the answer
finished, an error event, a stall), the request goes to the next target whose breaker allows it, with the
text streamed so far as a trailing assistant message to continue (prefill; vLLM is told so with
``continue_final_message``). That target's chunks are re-rendered under the first stream's ``id``, ``created``
and ``model``, their usage summed with the failed attempt's, the finish and usage chunks noting the failover in
``appliance.failover``; the surfaces translate them as any chunk, so the client reads one unbroken stream.
Streams that do not fail pay, per batch, a list append, a byte search for an error event and a clock read;
the stall timer is one per stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.accounts.usage import Tokens, estimate_prompt
from appliance.common.errors import GatewayError
from appliance.common.sse import event_data, json_objects
from appliance.core import resilience
from appliance.core.catalog import Route
from appliance.core.exchange import Exchange, charge_from, compute_cost, upstream_key, upstreams
from appliance.core.gateway import Gateway
from appliance.core.relay import first_events
from appliance.core.routing import Target
from appliance.observe import metrics
from appliance.providers.base import CHAT, Call

log = logging.getLogger("appliance.core.failover")

# A finish_reason that says the answer ended (not the null every other chunk carries).
_FINISHED = re.compile(rb'"finish_reason":\s*"')
# The chunk fields a continuation takes from the stream the client already reads.
_SAME = ("id", "created", "model")
# Backend kinds told to continue the trailing assistant message rather than answer after it.
_CONTINUES_FINAL = frozenset(("vllm",))


@dataclass(frozen=True, slots=True)
class Streamed:
    """What the failed stream sent before it failed."""

    text: str  # the answer's text (choice 0), the continuation's prefix
    content_events: int  # chunks that carried text: about one token each (``at_token``)
    tool_call: bool  # a tool call had begun: its arguments cannot be continued
    template: dict[str, Any]  # the first chunk's id, created and model


def streamed(batches: list[list[bytes]]) -> Streamed:
    """Read the failed stream's events (only now parsed)."""
    parts: list[str] = []
    events = 0
    tool_call = False
    template: dict[str, Any] = {}
    for batch in batches:
        for chunk in json_objects(batch):
            if "error" in chunk:
                continue
            if not template:
                template = {k: chunk[k] for k in _SAME if k in chunk}
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) and choice.get("index", 0) == 0 else None
                if not isinstance(delta, dict):
                    continue
                if delta.get("tool_calls"):
                    tool_call = True
                content = delta.get("content")
                if isinstance(content, str) and content:
                    parts.append(content)
                    events += 1
    return Streamed("".join(parts), events, tool_call, template)


def error_at(batch: list[bytes]) -> int | None:
    """The index of the first error event in a batch (``data: {"error": ...}``), or None."""
    for i, event in enumerate(batch):
        if b'"error"' not in event:  # a byte search: events that cannot be one are not parsed
            continue
        data = event_data(event)
        try:
            chunk = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(chunk, dict) and "error" in chunk:
            return i
    return None


def finished(batches: list[list[bytes]]) -> bool:
    """Did the stream end its answer (a finish_reason, or [DONE]) before it closed? Only the last batches tell."""
    for batch in batches[-2:]:
        for event in batch:
            if b"[DONE]" in event or _FINISHED.search(event):
                return True
    return False


def continued_body(body: dict[str, Any], prefix: str, kind: str) -> dict[str, Any]:
    """The request again, its answer so far as the assistant's last message, to be continued."""
    messages = list(body.get("messages") or [])
    if kind == "anthropic":
        prefix = prefix.rstrip()  # Anthropic refuses a prefill that ends in white space
    messages.append({"role": "assistant", "content": prefix})
    out = {**body, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if kind in _CONTINUES_FINAL:
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    return out


def rendered(batch: list[bytes], template: dict[str, Any], spent: Tokens, note: dict[str, Any]) -> list[bytes]:
    """A continuation's events as the client's stream goes on: its ids, the opening role chunk dropped, usage
    summed with the failed attempt's ``spent``, ``appliance.failover`` in the finish and usage chunks."""
    out = []
    for event in batch:
        data = event_data(event)
        if not data or data == b"[DONE]":
            out.append(event)
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            out.append(event)
            continue
        if not isinstance(chunk, dict) or "error" in chunk:
            out.append(event)  # the continuation's own failure: the relay ends the stream with it, as before
            continue
        if _restyled(chunk, template, spent, note):
            out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return out


def _restyled(chunk: dict[str, Any], template: dict[str, Any], spent: Tokens, note: dict[str, Any]) -> bool:
    """Rewrite one continuation chunk in place; False: drop it (the opening role chunk says nothing new)."""
    chunk.update(template)
    ends = False
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.pop("role", None) is not None and _opening(chunk, choice, delta):
            return False
        if choice.get("finish_reason") is not None:
            ends = True
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            usage["prompt_tokens"] = prompt + (spent.prompt or 0)
            usage["completion_tokens"] = completion + (spent.completion or 0)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ends = True
    if ends:
        chunk["appliance"] = {"failover": note}
    return True


async def _within(events: AsyncIterator[list[bytes]], stall_s: float, backend: str) -> AsyncIterator[list[bytes]]:
    """A continuation's events, each within the stall time (its chunks are parsed anyway: one hop more is
    nothing); a stall ends it with backend_timeout, which the stream ends with."""
    watch = StallWatch(stall_s)
    try:
        while True:
            watch.since = watch.loop.time()
            try:
                batch = await anext(events)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watch.stalled():
                    raise
                raise GatewayError("backend_timeout", f"backend {backend!r} sent nothing for {stall_s:g} s "
                                   "mid-stream") from None
            watch.since = None
            yield batch
    finally:
        watch.close()


def _opening(chunk: dict[str, Any], choice: dict[str, Any], delta: dict[str, Any]) -> bool:
    """A continuation's opening chunk, its role gone: nothing left for a client that already had one."""
    return (not delta.get("content") and len(delta) <= 1 and choice.get("finish_reason") is None
            and len(chunk["choices"]) == 1 and not isinstance(chunk.get("usage"), dict))


class StallWatch:
    """One timer for a whole stream, not one per read (``asyncio.timeout`` costs several µs each): a read
    marks when it began waiting (``since``); the timer, due a stall time after that, cancels the waiting
    task only if the same read is still waiting, else it is set again from the newer mark."""

    __slots__ = ("_fired", "_handle", "_s", "_task", "loop", "since")

    def __init__(self, stall_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._s = stall_s
        self._fired = False
        self.since: float | None = None  # when the read under way began; None: not reading
        self._handle = self.loop.call_at(self.loop.time() + stall_s, self._check)

    def _check(self) -> None:
        since, now = self.since, self.loop.time()
        if since is not None and now - since >= self._s and self._task is not None:
            self._fired = True
            self._task.cancel()
            return
        self._handle = self.loop.call_at((since if since is not None else now) + self._s, self._check)

    def stalled(self) -> bool:
        """Was the CancelledError just caught this watch's own? Then the task is no longer being cancelled."""
        if not self._fired:
            return False
        self._fired = False
        if self._task is not None:
            self._task.uncancel()
        return True

    def close(self) -> None:
        self._handle.cancel()


class Failover:
    """One streamed attempt's way on: the targets after it, and what happened if it was taken."""

    __slots__ = ("_body_for", "_first_token_s", "_gw", "_rest", "_x", "failure", "note", "seen", "stall_s")

    def __init__(self, gw: Gateway, x: Exchange, rest: list[tuple[Route, Target]],
                 body_for: Callable[[Route], dict[str, Any] | None], stall_s: float,
                 first_token_s: float | None) -> None:
        self._gw = gw
        self._x = x
        self._rest = rest  # the plan's targets after this one, in the strategy's order
        self._body_for = body_for  # the body a target gets (None: it cannot serve this request)
        self._first_token_s = first_token_s
        self.stall_s = stall_s
        self.seen: list[list[bytes]] = []
        self.failure: GatewayError | None = None  # the first backend's failure, once the stream went on
        self.note: dict[str, Any] | None = None  # {"from", "to", "at_token"}, once the stream went on

    async def watched(self, events: AsyncIterator[list[bytes]], first: list[bytes],
                      call: Call) -> AsyncIterator[list[bytes]]:
        """``first`` and the ``events`` after it as they come, then, if the backend fails, a continuation's."""
        if not first:
            yield first  # the stream ended at once: nothing to continue
            return
        seen = self.seen
        backend = self._x.route.backend if self._x.route is not None else "?"
        errored: list[bytes] | None = None  # an error event: sent on as it came if no target goes on
        ended = False  # closed before its answer finished: ended as it came if no target goes on
        pending: list[bytes] | None = first
        watch = StallWatch(self.stall_s)
        clock = watch.loop.time
        try:
            while True:
                try:
                    if pending is not None:
                        batch, pending = pending, None
                    else:
                        watch.since = clock()
                        batch = await anext(events)
                        watch.since = None
                except StopAsyncIteration:
                    if finished(seen):
                        return
                    ended = True
                    failure = GatewayError("backend_error", f"backend {backend!r} closed the stream before the "
                                           "answer finished")
                except asyncio.CancelledError:
                    if not watch.stalled():
                        raise  # the client went away (or the server stops): not the backend's failure
                    failure = GatewayError("backend_timeout", f"backend {backend!r} sent nothing for "
                                           f"{self.stall_s:g} s mid-stream")
                except GatewayError as exc:
                    failure = exc
                else:
                    bad = error_at(batch)
                    if bad is None:
                        seen.append(batch)
                        yield batch
                        continue
                    if bad:
                        seen.append(batch[:bad])
                        yield batch[:bad]
                    errored = batch[bad:]
                    failure = GatewayError("backend_error", f"backend {backend!r} sent an error event mid-stream")
                break
        finally:
            watch.close()
        went_on = False
        async with aclosing(self._continuation(call, failure)) as continuation:
            async for batch in continuation:
                went_on = True
                yield batch
        if went_on or ended:
            return  # (a stream that just ended with no target to go on ends as it did before)
        if errored is not None:
            yield errored  # no target to go on: the backend's error event reaches the client, as before
            return
        raise failure

    async def _continuation(self, call: Call, failure: GatewayError) -> AsyncIterator[list[bytes]]:
        """The first target after this one that starts answering the continued request; nothing if none does."""
        gw, x = self._gw, self._x
        failed = x.route
        assert failed is not None
        so_far = streamed(self.seen)
        if so_far.tool_call:
            return
        spent = Tokens(estimate_prompt(call.body), so_far.content_events, estimated=True)
        for route, target in self._rest:
            if not gw.breakers.allow(route.backend):
                continue
            body = self._body_for(route)
            if body is None:
                continue
            kind = upstreams(gw, x).providers[route.backend].kind
            next_call = Call(CHAT, continued_body(body, so_far.text, kind), x.upstream_id, x.headers,
                             limits=upstreams(gw, x).limits_for(route.backend, None),
                             api_key=upstream_key(x, route.backend))
            compute_cost(gw, x)  # the failed attempt's share of its backend's busy time ends here
            # Not queued behind other keys (core/admission.py): this client is in the middle of its answer.
            charge_from(gw, x, route.backend, gw.breakers.begin(route.backend, target.model))
            started = time.perf_counter()
            began = False
            try:
                async with upstreams(gw, x).providers[route.backend].stream(next_call) as upstream:
                    events = upstream.__aiter__()
                    first = await first_events(events, self._first_token_s or self.stall_s, route.backend)
                    began = True
                    note = self._went_on(failed, route, so_far, failure)
                    yield rendered(first, so_far.template, spent, note)
                    async with aclosing(_within(events, self.stall_s, route.backend)) as batches:
                        async for batch in batches:
                            yield rendered(batch, so_far.template, spent, note)
                self._observed(route, target, started, None)
                return
            except GatewayError as exc:
                self._observed(route, target, started, exc)
                if began:
                    raise  # the continuation failed too, after its first byte: the stream ends with its error
                log.info("stream failover to %r failed before its first byte: %s", route.backend, exc.message)
            finally:  # (a client that left counts neither way, as in the pipeline's attempts)
                gw.breakers.end(route.backend, target.model)
                gw.admission.released(route.backend)

    def _observed(self, route: Route, target: Target, started: float, failure: GatewayError | None) -> None:
        """The continuation's outcome, for its backend's breaker and the selector's latency view."""
        gw = self._gw
        gw.breakers.record(route.backend, ok=failure is None or not resilience.breaker_failure(failure))
        gw.selector.observe(target, time.perf_counter() - started,
                            ok=failure is None or not resilience.retryable(failure))

    def _went_on(self, failed: Route, route: Route, so_far: Streamed, failure: GatewayError) -> dict[str, Any]:
        """The stream is committed to ``route``: the exchange, the log and the metric learn of it."""
        x = self._x
        self.failure = failure
        self.note = {"from": f"{failed.backend}/{failed.upstream_model}",
                     "to": f"{route.backend}/{route.upstream_model}", "at_token": so_far.content_events}
        x.route = route
        x.fallback_from = x.fallback_from or failed
        # The failed backend no longer works for this request: out of its in-flight count now, not when the
        # continuation ends (the pipeline's attempt sees the note and leaves it).
        self._gw.breakers.end(failed.backend, failed.upstream_model)
        self._gw.admission.released(failed.backend)
        metrics.stream_failover(failed.backend, route.backend)
        log.warning("stream %s failed over from %s to %s at token %d: %s", x.request_id, self.note["from"],
                    self.note["to"], so_far.content_events, failure.message)
        return self.note

    def logged(self) -> str | None:
        """The request log's failover column."""
        return orjson.dumps(self.note).decode() if self.note is not None else None
