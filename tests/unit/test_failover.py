"""Mid-stream failover's pure parts: reading the failed stream, the continued body, re-rendering the continuation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from appliance.accounts.usage import Tokens
from appliance.common.errors import GatewayError
from appliance.core import failover

TEMPLATE = {"id": "chatcmpl-first", "created": 1700000001, "model": "first-model"}
NOTE = {"from": "a/m1", "to": "b/m2", "at_token": 2}


def event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-second", "object": "chat.completion.chunk", "created": 1800000000, "model": "m2",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **top}


def data(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(e[6:]) for e in events if e.startswith(b"data: {")]


def first_stream() -> list[list[bytes]]:
    role = {**chunk({"role": "assistant", "content": ""}), **TEMPLATE}
    return [[event(role), event({**chunk({"content": "Hel"}), **TEMPLATE})], [event({**chunk({"content": "lo"}),
                                                                                     **TEMPLATE})]]


def test_streamed_reads_the_text_the_tokens_and_the_first_ids() -> None:
    so_far = failover.streamed(first_stream())
    assert so_far.text == "Hello" and so_far.content_events == 2 and not so_far.tool_call
    assert so_far.template == TEMPLATE


def test_streamed_notes_a_tool_call_that_began() -> None:
    call = chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]})
    assert failover.streamed([*first_stream(), [event(call)]]).tool_call


def test_an_error_event_is_found_and_text_that_mentions_error_is_not() -> None:
    batch = [event(chunk({"content": 'say "error"'})), b'data: {"error": {"message": "boom"}}\n\n']
    assert failover.error_at(batch) == 1
    assert failover.error_at(batch[:1]) is None


def test_finished_needs_a_finish_reason_or_done() -> None:
    assert not failover.finished(first_stream())
    assert failover.finished([*first_stream(), [event(chunk({}, "stop"))]])
    assert failover.finished([[b"data: [DONE]\n\n"]])


def test_the_continued_body_ends_with_the_prefix_and_asks_vllm_to_continue_it() -> None:
    body = {"model": "m2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    plain = failover.continued_body(body, "Hello ", "llamacpp")
    assert plain["messages"][-1] == {"role": "assistant", "content": "Hello "}
    assert plain["stream_options"] == {"include_usage": True} and "continue_final_message" not in plain
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # the original is left as it was
    vllm = failover.continued_body(body, "Hello ", "vllm")
    assert vllm["continue_final_message"] is True and vllm["add_generation_prompt"] is False
    assert failover.continued_body(body, "Hello ", "anthropic")["messages"][-1]["content"] == "Hello"


def test_continuation_chunks_take_the_first_streams_ids_and_drop_the_opening_role_chunk() -> None:
    batch = [event(chunk({"role": "assistant", "content": ""})), event(chunk({"content": " world"}))]
    out = data(failover.rendered(batch, TEMPLATE, Tokens(7, 2), NOTE))
    assert len(out) == 1
    assert {k: out[0][k] for k in TEMPLATE} == TEMPLATE
    assert out[0]["choices"][0]["delta"] == {"content": " world"} and "appliance" not in out[0]


def test_a_role_chunk_that_carries_text_keeps_its_text() -> None:
    out = data(failover.rendered([event(chunk({"role": "assistant", "content": "x"}))], TEMPLATE, Tokens(1, 1), NOTE))
    assert out[0]["choices"][0]["delta"] == {"content": "x"}


def test_the_finish_and_usage_chunks_carry_the_note_and_usage_sums_both_attempts() -> None:
    usage = {"id": "chatcmpl-second", "object": "chat.completion.chunk", "created": 1800000000, "model": "m2",
             "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}}
    batch = [event(chunk({}, "stop")), event(usage), b"data: [DONE]\n\n"]
    rendered = failover.rendered(batch, TEMPLATE, Tokens(7, 2), NOTE)
    finish, summed = data(rendered)
    assert finish["appliance"] == {"failover": NOTE} and finish["id"] == "chatcmpl-first"
    assert summed["usage"] == {"prompt_tokens": 27, "completion_tokens": 6, "total_tokens": 33}
    assert summed["appliance"] == {"failover": NOTE}
    assert rendered[-1] == b"data: [DONE]\n\n"


def test_a_continuations_error_event_passes_as_it_came() -> None:
    error = b'data: {"error": {"message": "boom"}}\n\n'
    assert failover.rendered([error], TEMPLATE, Tokens(1, 1), NOTE) == [error]


def _lone(stall_s: float) -> failover.Failover:
    x: Any = type("X", (), {"route": type("R", (), {"backend": "a", "upstream_model": "m1"})()})()
    return failover.Failover(None, x, [], lambda route: None, stall_s, None)  # type: ignore[arg-type]


FIRST = [event(chunk({"role": "assistant", "content": ""}))]


async def _collect(fo: failover.Failover, events: AsyncIterator[list[bytes]]) -> list[list[bytes]]:
    """What the watch passes on after the stream's first batch (which it passes on first)."""
    out = [batch async for batch in fo.watched(events, FIRST, None)]  # type: ignore[arg-type]
    assert out[0] == FIRST
    return out[1:]


async def _source(*batches: list[bytes], then: BaseException | None = None,
                  hang: bool = False) -> AsyncIterator[list[bytes]]:
    for batch in batches:
        yield batch
    if then is not None:
        raise then
    if hang:
        await asyncio.Event().wait()


def _no_continuation(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nothing(self: Any, call: Any, failure: Any) -> AsyncIterator[list[bytes]]:
        return
        yield  # pragma: no cover  (an async generator that yields nothing)

    monkeypatch.setattr(failover.Failover, "_continuation", nothing)


def test_with_no_target_left_an_error_event_goes_out_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_continuation(monkeypatch)
    error = b'data: {"error": {"message": "boom"}}\n\n'
    ok = event(chunk({"content": "a"}))
    out = asyncio.run(_collect(_lone(5), _source([ok, error])))
    assert out == [[ok], [error]]


def test_with_no_target_left_a_reset_is_raised_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_continuation(monkeypatch)
    with pytest.raises(GatewayError) as caught:
        asyncio.run(_collect(_lone(5), _source(then=GatewayError("backend_unreachable", "reset"))))
    assert caught.value.code == "backend_unreachable"


def test_a_stall_is_a_timeout_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_continuation(monkeypatch)
    with pytest.raises(GatewayError) as caught:
        asyncio.run(_collect(_lone(0.01), _source(hang=True)))
    assert caught.value.code == "backend_timeout" and "mid-stream" in caught.value.message


def test_a_stream_that_finished_passes_through_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_continuation(monkeypatch)
    batches = [[event(chunk({"content": "a"}))], [event(chunk({}, "stop")), b"data: [DONE]\n\n"]]
    assert asyncio.run(_collect(_lone(5), _source(*batches))) == batches


def test_an_error_event_in_the_first_batch_is_caught_too(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_continuation(monkeypatch)
    error = b'data: {"error": {"message": "boom"}}\n\n'
    text = event(chunk({"content": "a"}))
    fo = _lone(5)
    out = asyncio.run(_gather(fo.watched(_source(), [text, error], None)))  # type: ignore[arg-type]
    assert out == [[text], [error]]  # no target to go on: the error event goes out, after what came before it
    assert fo.seen == [[text]]


async def _gather(events: AsyncIterator[list[bytes]]) -> list[list[bytes]]:
    return [batch async for batch in events]


def test_the_meters_estimated_usage_chunk_carries_the_note_when_the_continuation_reported_none() -> None:
    from appliance.accounts.usage import StreamMeter

    meter = StreamMeter(client_wants_usage=True)
    meter.feed([event({**chunk({"content": "a"}), **TEMPLATE})])
    tail = meter.finish({"messages": [{"role": "user", "content": "hi"}]}, {"failover": NOTE})
    (last,) = data([e + b"\n\n" for e in tail.split(b"\n\n") if e.startswith(b"data: {")])
    assert last["appliance"] == {"failover": NOTE} and last["usage"]["estimated"] is True
    assert b"appliance" not in StreamMeter(client_wants_usage=True).finish({})


def test_a_continuation_that_stalls_ends_with_a_timeout() -> None:
    batch = [event(chunk({"content": "a"}))]
    with pytest.raises(GatewayError) as caught:
        asyncio.run(_gather(failover._within(_source(batch, hang=True), 0.01, "b")))
    assert caught.value.code == "backend_timeout"
    assert asyncio.run(_gather(failover._within(_source(batch), 5, "b"))) == [batch]
