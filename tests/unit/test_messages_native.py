"""The side-watch of passed-through Messages streams: usage, the stop and errors from Anthropic's events."""

from __future__ import annotations

import json
from typing import Any

from appliance.accounts.usage import Tokens
from appliance.api.messages.native import StreamWatch, tokens_of


def event(data: dict[str, Any], space: bool = True) -> bytes:
    return f"event:{' ' if space else ''}{data['type']}\ndata: {json.dumps(data)}\n\n".encode()


START = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
         "usage": {"input_tokens": 21, "output_tokens": 1, "cache_read_input_tokens": 4,
                   "cache_creation_input_tokens": 2}}}
BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * 40}}
END = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
       "usage": {"output_tokens": 7}}
STOP = {"type": "message_stop"}


def test_usage_from_start_and_delta() -> None:
    watch = StreamWatch(prompt_estimate=99)
    watch.see([event(START), event(BLOCK), event({"type": "ping"})])
    watch.see([event(DELTA), event(END, space=False), event(STOP)])
    assert watch.tokens() == Tokens(27, 7, cached=4)  # input excludes cache reads and writes: 21 + 4 + 2
    assert watch.stopped and watch.error is None and watch.first_delta_at is not None


def test_cumulative_input_in_message_delta_wins() -> None:
    watch = StreamWatch(prompt_estimate=99)
    later = {**END, "usage": {"output_tokens": 7, "input_tokens": 30, "cache_read_input_tokens": 0}}
    watch.see([event(START), event(later)])
    assert watch.tokens() == Tokens(30, 7)


def test_missing_usage_is_estimated() -> None:
    watch = StreamWatch(prompt_estimate=12)
    watch.see([event({**START, "message": {**START["message"], "usage": None}}), event(DELTA), event(DELTA)])
    tokens = watch.tokens()
    assert tokens.estimated and tokens.prompt == 12 and tokens.completion and tokens.completion > 0
    assert not watch.stopped


def test_error_event_is_seen() -> None:
    watch = StreamWatch(prompt_estimate=1)
    watch.see([event(START), event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})])
    assert watch.error is not None and watch.error.code == "backend_overloaded" and not watch.stopped


def test_tokens_of() -> None:
    assert tokens_of({"input_tokens": 0, "output_tokens": 3, "cache_read_input_tokens": 10}) == Tokens(10, 3, cached=10)
    assert tokens_of({"output_tokens": 3}) is None and tokens_of(None) is None
