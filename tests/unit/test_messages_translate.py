"""Anthropic Messages clients on chat backends, without a network (spec §4, §5, pitfalls §5.4).

Answers and streams are also read back through the official anthropic SDK (over a mock transport, with
strict response validation), so "the SDK accepts it" is tested, not assumed.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import orjson
import pydantic
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent

from appliance.api.messages import stream as messages_stream
from appliance.api.messages.request import chat_request, count_request, count_tokens, dropped_tools, wants_thinking
from appliance.api.messages.stream import MessagesStream
from appliance.api.messages.translate import (
    error_body,
    error_message,
    error_status,
    error_type,
    message_response,
    tool_input,
    tool_use_id,
)
from appliance.common.errors import GatewayError

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
TOOL_ID = re.compile(r"^[A-Za-z0-9_-]+$")
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}], **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return chat_request(body(**fields))


def msgs(*messages: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    return chat_request(body(messages=list(messages), **fields))["messages"]


def invalid(request: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        chat_request(request)
    return caught.value


# ------------------------------------------------------------------------------------------ SDK helpers


def client(status: int, content: bytes, content_type: str = "application/json") -> anthropic.Anthropic:
    """An SDK client whose every request gets this answer."""
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=content, headers={"content-type": content_type,
                                                                 "request-id": "req_1"})
    return anthropic.Anthropic(api_key="k", base_url="http://gateway.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
                               _strict_response_validation=True)


def sdk_message(answer: dict[str, Any]) -> Message:
    return client(200, orjson.dumps(answer)).messages.create(**body())


def sdk_final(sse: bytes) -> Message:
    """What ``client.messages.stream(...).get_final_message()`` makes of these events."""
    with client(200, sse, "text/event-stream").messages.stream(**body()) as stream:
        return stream.get_final_message()


def events(sse: bytes) -> list[dict[str, Any]]:
    """The events as data dicts, after checking their framing: a named event per frame, name == data.type."""
    assert sse.endswith(b"\n\n")
    out = []
    for frame in sse[:-2].split(b"\n\n"):
        name_line, data_line = frame.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        data = orjson.loads(data_line[6:])
        assert data["type"] == name_line[7:].decode()
        if data["type"] not in ("ping", "error"):
            STREAM_EVENT.validate_python(data)
        out.append(data)
    return out


def types(sse: bytes) -> list[str]:
    out = []
    for event in events(sse):
        kind = event["type"]
        if kind == "content_block_start":
            kind += ":" + event["content_block"]["type"]
        elif kind == "content_block_delta":
            kind += ":" + event["delta"]["type"]
        out.append(kind)
    return out


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish, **extra}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "b", "choices": [choice]}


def text_chunks(*texts: str) -> list[dict[str, Any]]:
    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": t}) for t in texts)]


def call(index: int, fragment: str | dict[str, Any] | None = None, *, id: str | None = None,
         name: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if fragment is not None:
        function["arguments"] = fragment
    entry: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        entry.update(id=id, type="function")
    return chunk({"tool_calls": [entry]})


def usage_chunk(prompt: int = 10, completion: int = 3, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "b", "choices": [],
            "usage": usage}


def run(chunks: list[dict[str, Any]], *, finish: bool = True, **options: Any) -> tuple[bytes, MessagesStream]:
    options.setdefault("request", chat(stream=True))
    stream = MessagesStream("m", **options)
    sse = stream.start() + b"".join(stream.feed(c) for c in chunks)
    if finish:
        sse += stream.finish()
    return sse, stream


def weather_call(*fragments: str, id: str = "call_abc", index: int = 0) -> list[dict[str, Any]]:
    first, *rest = fragments or ("",)
    return [call(index, first, id=id, name="get_weather"), *(call(index, f) for f in rest)]


# ------------------------------------------------------------------------------------------ requests


def test_text_request() -> None:  # conformance test 18, backend side
    request = chat(system=[{"type": "text", "text": "Be terse", "cache_control": {"type": "ephemeral"}}])
    assert request == {"model": "m", "messages": [{"role": "system", "content": "Be terse"},
                                                  {"role": "user", "content": "Hi"}],
                       "max_tokens": 64, "stream": False}


def test_stream_asks_for_usage() -> None:
    request = chat(stream=True)
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("system", "expected"), [
    ("S", [{"role": "system", "content": "S"}]),
    ("", []),
    ([], []),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], [{"role": "system", "content": "a\nb"}]),
])
def test_system(system: Any, expected: list[dict[str, Any]]) -> None:
    assert msgs({"role": "user", "content": "Hi"}, system=system)[:-1] == expected


def test_system_role_mid_conversation() -> None:
    assert msgs({"role": "user", "content": "a"}, {"role": "system", "content": [{"type": "text", "text": "S"}]},
                {"role": "user", "content": "b"}) == [
        {"role": "user", "content": "a"}, {"role": "system", "content": "S"}, {"role": "user", "content": "b"}]


def test_user_text_blocks_collapse_to_a_string() -> None:
    assert msgs({"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                                             {"type": "text", "text": ""}, {"type": "text", "text": "b"}]}) == [
        {"role": "user", "content": "a\nb"}]


def test_images() -> None:
    content = [{"type": "text", "text": "look"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
               {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.jpg"}}]
    assert msgs({"role": "user", "content": content}) == [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}}]}]


def test_tool_round_trip_with_images() -> None:  # conformance test 22
    out = msgs(
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "text", "text": "also this"},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "text", "text": "sunny"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]})
    assert out == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": "also this"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    ]


def test_tool_results_come_first_in_their_turn() -> None:  # pitfall 5
    out = msgs(
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "b", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "text", "text": "first"},
                                     {"type": "tool_result", "tool_use_id": "a", "content": "A"},
                                     {"type": "text", "text": "between"},
                                     {"type": "tool_result", "tool_use_id": "b", "content": "B"}]})
    assert [m["role"] for m in out] == ["user", "assistant", "tool", "tool", "user"]
    assert out[1]["content"] is None
    assert [m.get("tool_call_id") for m in out[2:4]] == ["a", "b"]
    assert out[4] == {"role": "user", "content": "first\nbetween"}


@pytest.mark.parametrize(("result", "content"), [
    ({"content": "ok"}, "ok"),
    ({}, ""),
    ({"content": []}, ""),
    ({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, "a\nb"),
    ({"content": "boom", "is_error": True}, "Error: boom"),
    ({"is_error": True}, "Error"),
    ({"content": "fine", "is_error": False}, "fine"),
    ({"content": [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}]},
     "doc"),
    ({"content": [{"type": "tool_reference", "tool_name": "x"}, {"type": "text", "text": "t"}]}, "t"),
])
def test_tool_result_content(result: dict[str, Any], content: str) -> None:
    out = msgs({"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", **result}]})
    assert out[-1] == {"role": "tool", "tool_call_id": "t1", "content": content}


def test_same_role_turns_merge() -> None:
    out = msgs({"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
               {"role": "assistant", "content": "c"}, {"role": "assistant", "content": [
                   {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 1}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]},
               {"role": "user", "content": "d"})
    assert out == [{"role": "user", "content": "a\nb"},
                   {"role": "assistant", "content": "c", "tool_calls": [
                       {"id": "t", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}]},
                   {"role": "tool", "tool_call_id": "t", "content": "r"},
                   {"role": "user", "content": "d"}]


def test_thinking_and_unknown_blocks_are_dropped() -> None:
    out = msgs({"role": "user", "content": "a"},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                                 {"type": "redacted_thinking", "data": "x"}]},
               {"role": "user", "content": [{"type": "future_block", "x": 1}, {"type": "text", "text": "b"}]},
               {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": ""},
                                                 {"type": "text", "text": "answer"}]})
    # The assistant turn left empty disappears and the user turns around it merge: roles still alternate.
    assert out == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "answer"}]


def test_prefill_is_kept_last() -> None:
    out = msgs({"role": "user", "content": "Pick"}, {"role": "assistant", "content": "The answer is ("})
    assert out[-1] == {"role": "assistant", "content": "The answer is ("}


def test_text_document_becomes_text() -> None:
    out = msgs({"role": "user", "content": [
        {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "x"}},
        {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "y"}]}},
        {"type": "text", "text": "sum up"}]})
    assert out == [{"role": "user", "content": "Notes\n\nx\ny\nsum up"}]


def test_tools() -> None:
    request = chat(tools=[WEATHER, {"name": "noop", "input_schema": {"type": "object"}, "strict": True,
                                    "cache_control": {"type": "ephemeral"}, "type": "custom"}])
    assert request["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                          "parameters": WEATHER_SCHEMA}},
        {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}, "strict": True}}]
    assert "tool_choice" not in request


@pytest.mark.parametrize(("choice", "expected", "parallel"), [
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, None),
    ({"type": "none"}, "none", None),
    ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ({"type": "any", "disable_parallel_tool_use": False}, "required", None),
])
def test_tool_choice(choice: dict[str, Any], expected: Any, parallel: bool | None) -> None:  # conformance test 20
    request = chat(tools=[WEATHER], tool_choice=choice)
    assert request["tool_choice"] == expected
    assert request.get("parallel_tool_calls") == parallel


def test_server_tools_are_dropped() -> None:
    server = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
              {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
              {"type": "bash_20250124", "name": "bash"}]
    request = body(tools=[*server[:2], WEATHER, server[2]], tool_choice={"type": "auto"})
    assert chat_request(request)["tools"] == chat(tools=[WEATHER])["tools"]
    assert dropped_tools(request) == ["web_search_20250305", "tool_search_tool_regex_20251119", "bash_20250124"]
    assert dropped_tools(body(tools=[WEATHER, {**WEATHER, "type": "custom"}])) == []
    assert dropped_tools(body()) == []
    only_server = chat_request(body(tools=server[:1], tool_choice={"type": "any"}))
    assert "tools" not in only_server and "tool_choice" not in only_server


def test_tool_choice_without_tools_is_dropped() -> None:
    assert "tool_choice" not in chat(tool_choice={"type": "any"})


def test_sampling_and_other_fields() -> None:
    request = chat(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["END", "STOP"],
                   metadata={"user_id": "u-1"}, thinking={"type": "enabled", "budget_tokens": 2048},
                   service_tier="auto", container=None, context_management={}, mcp_servers=[],
                   anthropic_future_field={"x": 1})
    assert request == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64,
                       "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": ["END", "STOP"], "user": "u-1",
                       "stream": False}


def test_empty_optional_fields_stay_out() -> None:
    assert chat(stop_sequences=[], metadata={}, temperature=None) == chat()
    assert chat(metadata={"user_id": None}) == chat()


def test_max_tokens_zero_is_allowed() -> None:  # cache pre-warm
    assert chat(max_tokens=0)["max_tokens"] == 0


def test_output_format() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    request = chat(output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"})
    assert request["response_format"] == {"type": "json_schema",
                                          "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert "response_format" not in chat(output_config={"effort": "high"})


def test_wants_thinking() -> None:
    assert wants_thinking(body(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert wants_thinking(body(thinking={"type": "adaptive"}))
    assert not wants_thinking(body(thinking={"type": "disabled"}))
    assert not wants_thinking(body())


def test_request_is_not_modified() -> None:
    original = body(system="S", tools=[WEATHER], messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "user", "content": "b"}])
    kept = copy.deepcopy(original)
    chat_request(original)
    assert original == kept


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("change", "code", "param"), [
    ({"model": None}, "missing_field", "model"),
    ({"model": 42}, "invalid_value", "model"),
    ({"model": ""}, "invalid_value", "model"),
    ({"max_tokens": None}, "missing_field", "max_tokens"),
    ({"max_tokens": "10"}, "invalid_value", "max_tokens"),
    ({"max_tokens": -1}, "invalid_value", "max_tokens"),
    ({"max_tokens": True}, "invalid_value", "max_tokens"),
    ({"max_tokens": 1.5}, "invalid_value", "max_tokens"),
    ({"messages": None}, "missing_field", "messages"),
    ({"messages": "Hi"}, "invalid_value", "messages"),
    ({"messages": []}, "invalid_value", "messages"),
    ({"messages": ["Hi"]}, "invalid_value", "messages.0"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "invalid_value", "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "missing_field", "messages.0.content"),
    ({"messages": [{"role": "user", "content": 42}]}, "invalid_value", "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "invalid_value", "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "invalid_value", "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "invalid_value",
     "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "invalid_value",
     "messages.0.content.0.source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "invalid_value", "messages.0.content.0.source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                                             "media_type": "image/png"}}]}]},
     "invalid_value", "messages.0.content.0.source.data"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "AA"}}]}]},
     "invalid_value", "messages.0.content.0.source.media_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url"}}]}]},
     "invalid_value", "messages.0.content.0.source.url"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]},
     "invalid_value", "messages.0.content.0.source"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
     "invalid_value", "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}]}]},
     "invalid_value", "messages.1.content.0.type"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t"}]}]}, "invalid_value", "messages.1.content.0.type"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "name": "f", "input": {}}]}]}, "missing_field", "messages.1.content.0.id"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": 7, "input": {}}]}]}, "invalid_value", "messages.1.content.0.name"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": [1]}]}]}, "invalid_value",
     "messages.1.content.0.input"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}, "missing_field",
     "messages.0.content.0.tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]},
     "invalid_value", "messages.0.content.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "image"}]}]}]},
     "invalid_value", "messages.0.content.0.content.0.source"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": "yes"}]}]},
     "invalid_value", "messages.0.content.0.is_error"),
    # Merged turns keep the index the client sent.
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image"}]}]},
     "invalid_value", "messages.1.content.0.source"),
    ({"system": 42}, "invalid_value", "system"),
    ({"system": [{"type": "image"}]}, "invalid_value", "system.0"),
    ({"messages": [{"role": "system", "content": 3}]}, "invalid_value", "messages.0.content"),
    ({"tools": {"name": "x"}}, "invalid_value", "tools"),
    ({"tools": ["x"]}, "invalid_value", "tools.0"),
    ({"tools": [{"input_schema": {}}]}, "missing_field", "tools.0.name"),
    ({"tools": [{"name": "", "input_schema": {}}]}, "invalid_value", "tools.0.name"),
    ({"tools": [WEATHER, {"name": "x"}]}, "missing_field", "tools.1.input_schema"),
    ({"tools": [{"name": "x", "input_schema": "object"}]}, "invalid_value", "tools.0.input_schema"),
    ({"tool_choice": "auto"}, "invalid_value", "tool_choice.type"),
    ({"tool_choice": {"type": "bogus"}}, "invalid_value", "tool_choice.type"),
    ({"tool_choice": {"type": "tool"}}, "invalid_value", "tool_choice.name"),
    ({"stop_sequences": "END"}, "invalid_value", "stop_sequences"),
    ({"stop_sequences": ["END", 3]}, "invalid_value", "stop_sequences"),
    ({"temperature": "hot"}, "invalid_value", "temperature"),
    ({"top_p": True}, "invalid_value", "top_p"),
    ({"top_k": 0.5}, "invalid_value", "top_k"),
    ({"metadata": "u"}, "invalid_value", "metadata"),
    ({"metadata": {"user_id": 5}}, "invalid_value", "metadata.user_id"),
    ({"stream": "yes"}, "invalid_value", "stream"),
    ({"output_config": "json"}, "invalid_value", "output_config"),
    ({"output_config": {"format": {"type": "json_object"}}}, "invalid_value", "output_config.format"),
])
def test_validation(change: dict[str, Any], code: str, param: str) -> None:
    request = body(**change)
    for name, value in change.items():
        if value is None:
            del request[name]
    err = invalid(request)
    assert (err.code, err.param, err.status, err.type) == (code, param, 400, "invalid_request_error")
    assert err.message.startswith(f"{param}: ")
    assert orjson.loads(error_body(err))["error"] == {"type": "invalid_request_error", "message": err.message}


def test_body_must_be_an_object() -> None:
    err = invalid([1, 2])  # type: ignore[arg-type]
    assert err.status == 400


GARBAGE = [None, 0, -1, 1.5, True, "", "x", [], [None], [1], {}, {"type": None}, {"type": 1}, {"type": []},
           {"type": "text"},
           {"type": "image", "source": None}, {"type": "tool_result", "content": {}}, [{"type": "tool_use"}]]


def _places(value: Any) -> Iterator[dict[str, Any]]:
    base = {"model": "m", "max_tokens": 5, "system": "S", "tools": [WEATHER], "tool_choice": {"type": "auto"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]}
    for key in list(base):
        yield {**base, key: value}
    for i, key in itertools.product(range(3), ("role", "content")):
        messages = copy.deepcopy(base["messages"])
        messages[i][key] = value
        yield {**base, "messages": messages}
    for i in range(3):
        messages = copy.deepcopy(base["messages"])
        messages[i]["content"] = [value]
        yield {**base, "messages": messages}
        messages = copy.deepcopy(base["messages"])
        block = messages[i]["content"][0]
        for key in list(block):
            yield {**base, "messages": [*messages[:i], {**messages[i], "content": [{**block, key: value}]},
                                        *messages[i + 1:]]}
    yield {**base, "tools": [value]}
    yield {**base, "tools": [{**WEATHER, "input_schema": value}]}
    yield {**base, "tool_choice": {"type": "tool", "name": value}}
    yield {**base, "metadata": value}
    yield {**base, "output_config": {"format": value}}


@pytest.mark.parametrize("value", GARBAGE, ids=repr)
def test_garbage_never_escapes_as_another_exception(value: Any) -> None:
    for request in _places(value):
        for translate in (chat_request, count_tokens):
            try:
                translate(request)
            except GatewayError as err:
                assert err.status == 400
                assert err.param is None or isinstance(err.param, str)


# ------------------------------------------------------------------------------------------ count_tokens


def test_count_tokens() -> None:  # conformance test 25
    plain = {"model": "m", "messages": [{"role": "user", "content": "Hello there, how are you today?"}]}
    counted = count_tokens(plain)
    MessageTokensCount.model_validate(counted)
    assert counted["input_tokens"] > 0
    assert count_tokens({**plain, "system": "You are a helpful assistant."})["input_tokens"] > counted["input_tokens"]
    assert count_tokens({**plain, "tools": [WEATHER]})["input_tokens"] > counted["input_tokens"]


def test_count_request_is_the_prompt_only() -> None:
    request = count_request({"model": "m", "system": "S", "messages": [{"role": "user", "content": "x"}],
                             "tools": [WEATHER], "tool_choice": {"type": "any"}, "thinking": {"type": "enabled"}})
    assert request == {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}],
                       "tools": chat(tools=[WEATHER])["tools"], "tool_choice": "required"}


def test_count_tokens_validates_like_create() -> None:
    with pytest.raises(GatewayError) as caught:
        count_tokens({"model": "m"})
    assert (caught.value.code, caught.value.param) == ("missing_field", "messages")
    with pytest.raises(GatewayError) as caught:
        count_tokens({"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]})
    assert caught.value.param == "messages.0.content.0.source"


# ------------------------------------------------------------------------------------------ answers


def completion(content: Any = "Hello!", *, finish: str = "stop", tool_calls: list[dict[str, Any]] | None = None,
               usage: dict[str, Any] | None = None, **choice_extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    answer: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "backend",
                              "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                           **choice_extra}]}
    answer["usage"] = usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 3,
                                                       "total_tokens": 13}
    return answer


def tool_call(arguments: Any = '{"city":"Paris"}', id: Any = "call_abc", name: str = "get_weather") -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_text_message() -> None:  # conformance test 18
    answer = message_response(completion(), model="m")
    assert answer["id"].startswith("msg_")
    assert answer == {"id": answer["id"], "type": "message", "role": "assistant", "model": "m",
                      "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
                      "stop_sequence": None,
                      "usage": {"input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}}
    parsed = sdk_message(answer)
    assert parsed.content[0].type == "text" and parsed.content[0].text == "Hello!"
    assert parsed.usage.input_tokens == 10 and parsed.usage.output_tokens == 3


def test_text_and_tool_use() -> None:  # conformance test 20, pitfall 6: the text is kept beside the call
    answer = message_response(completion("Checking", finish="tool_calls", tool_calls=[tool_call()]), model="m")
    assert answer["content"] == [{"type": "text", "text": "Checking"},
                                 {"type": "tool_use", "id": "call_abc", "name": "get_weather",
                                  "input": {"city": "Paris"}}]
    assert answer["stop_reason"] == "tool_use"
    parsed = sdk_message(answer)
    assert parsed.content[1].type == "tool_use" and parsed.content[1].input == {"city": "Paris"}


def test_tool_use_when_the_backend_says_stop() -> None:  # pitfall 4
    answer = message_response(completion(None, finish="stop", tool_calls=[tool_call()]), model="m")
    assert [b["type"] for b in answer["content"]] == ["tool_use"]
    assert answer["stop_reason"] == "tool_use"


def test_tool_calls_finish_without_calls_is_end_turn() -> None:
    assert message_response(completion("x", finish="tool_calls"), model="m")["stop_reason"] == "end_turn"


@pytest.mark.parametrize(("call_id", "expected"), [
    ("call_abc", "call_abc"),
    ("toolu_01A-b_c", "toolu_01A-b_c"),
    ("functions.Bash:0", "functions_Bash_0"),
    ("call 1/2", "call_1_2"),
])
def test_tool_use_ids(call_id: str, expected: str) -> None:
    assert tool_use_id(call_id) == expected
    answer = message_response(completion(None, tool_calls=[tool_call(id=call_id)]), model="m")
    assert answer["content"][0]["id"] == expected


@pytest.mark.parametrize("call_id", [None, ""])
def test_tool_use_id_minted_when_missing(call_id: Any) -> None:
    minted = tool_use_id(call_id)
    assert minted.startswith("toolu_") and TOOL_ID.match(minted)
    assert tool_use_id(call_id) != minted


@pytest.mark.parametrize(("arguments", "expected"), [
    ('{"city":"Paris"}', {"city": "Paris"}),
    ({"city": "Paris"}, {"city": "Paris"}),
    ("", {}),
    ("  ", {}),
    (None, {}),
    ("{}", {}),
    ('{"city": "Par', {"city": "Par"}),  # cut short by max_tokens
    ('{"a": {"b": [1, 2', {"a": {"b": [1, 2]}}),
    ('{"a": 1,', {"a": 1}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('"{\\"a\\": 1}"', {"a": 1}),  # encoded twice
    ('{"path": "a\\"b', {"path": 'a"b'}),
    ("not json at all", {}),
    ("[1, 2]", {}),
    ("42", {}),
    ('{"a": }', {}),
])
def test_tool_input(arguments: Any, expected: dict[str, Any]) -> None:
    assert tool_input(arguments) == expected


def test_invalid_arguments_do_not_lose_the_answer() -> None:  # pitfall 6
    answer = message_response(completion("Let me check", tool_calls=[tool_call("{oops"), tool_call(id="call_2")]),
                              model="m")
    assert [b.get("input") for b in answer["content"]] == [None, {}, {"city": "Paris"}]
    sdk_message(answer)


@pytest.mark.parametrize(("finish", "extra", "request_fields", "usage", "reason", "sequence"), [
    ("stop", {}, {}, None, "end_turn", None),
    ("length", {}, {}, {"prompt_tokens": 10, "completion_tokens": 16}, "max_tokens", None),
    ("length", {}, {"max_tokens": 3}, None, "max_tokens", None),
    ("length", {}, {}, {}, "max_tokens", None),  # no usage: nothing tells the context ran out
    # Fewer tokens than asked for: the context window ran out first.
    ("length", {}, {"max_tokens": 64}, {"prompt_tokens": 4000, "completion_tokens": 12},
     "model_context_window_exceeded", None),
    ("content_filter", {}, {}, None, "refusal", None),
    ("stop", {"stop_reason": "END"}, {"stop_sequences": ["END"]}, None, "stop_sequence", "END"),
    ("stop", {"stop_reason": "END"}, {}, None, "end_turn", None),  # not one of the client's sequences
    ("stop", {"stop_reason": 128001}, {"stop_sequences": ["END"]}, None, "end_turn", None),  # vLLM's EOS token id
    (None, {}, {}, None, "end_turn", None),
])
def test_stop_reasons(finish: str | None, extra: dict[str, Any], request_fields: dict[str, Any],
                      usage: dict[str, Any] | None, reason: str, sequence: str | None) -> None:  # conformance test 23
    request = chat(**{"max_tokens": 16, **request_fields})
    answer = message_response(completion("Done", finish=finish, usage=usage, **extra), model="m", request=request)
    assert (answer["stop_reason"], answer["stop_sequence"]) == (reason, sequence)
    Message.model_validate(answer)


def test_stop_sequence_without_the_request() -> None:
    answer = message_response(completion("x", stop_reason="END"), model="m")
    assert (answer["stop_reason"], answer["stop_sequence"]) == ("stop_sequence", "END")


def test_length_wins_over_a_cut_tool_call() -> None:
    answer = message_response(completion(None, finish="length", tool_calls=[tool_call('{"city": "Pa')]), model="m")
    assert answer["stop_reason"] == "max_tokens"
    assert answer["content"][0]["input"] == {"city": "Pa"}


def test_refusal_field() -> None:
    answer = message_response({"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I can't help with that."}}]}, model="m")
    assert answer["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert answer["stop_reason"] == "refusal"


def test_cached_tokens_are_not_counted_twice() -> None:  # pitfall 8
    usage = {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
             "prompt_tokens_details": {"cached_tokens": 60}}
    answer = message_response(completion(usage=usage), model="m")
    assert answer["usage"] == {"input_tokens": 40, "output_tokens": 7, "cache_creation_input_tokens": 0,
                               "cache_read_input_tokens": 60}
    usage["prompt_tokens_details"] = {"cached_tokens": 60, "cache_write_tokens": 30}
    parsed = sdk_message(message_response(completion(usage=usage), model="m")).usage
    assert (parsed.input_tokens, parsed.cache_read_input_tokens, parsed.cache_creation_input_tokens) == (10, 60, 30)
    assert parsed.input_tokens + parsed.cache_read_input_tokens + parsed.cache_creation_input_tokens == 100


def test_usage_estimated_when_the_backend_reports_none() -> None:
    answer = completion("Hello there, this is a longer answer.")
    del answer["usage"]
    usage = message_response(answer, model="m", request=chat())["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert message_response(answer, model="m")["usage"]["input_tokens"] == 0


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning"])
def test_reasoning_becomes_thinking_only_when_asked(name: str) -> None:
    answer = completion("42")
    answer["choices"][0]["message"][name] = "Let me think."
    assert message_response(answer, model="m")["content"] == [{"type": "text", "text": "42"}]
    with_thinking = message_response(answer, model="m", thinking=True)
    assert with_thinking["content"] == [{"type": "thinking", "thinking": "Let me think.", "signature": ""},
                                        {"type": "text", "text": "42"}]
    assert sdk_message(with_thinking).content[0].type == "thinking"


@pytest.mark.parametrize("content", ["", None, []])
def test_empty_answer(content: Any) -> None:
    answer = message_response(completion(content), model="m")
    assert answer["content"] == [] and answer["stop_reason"] == "end_turn"
    sdk_message(answer)


def test_content_parts_answer() -> None:
    answer = message_response(completion([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]), model="m")
    assert answer["content"] == [{"type": "text", "text": "ab"}]


def test_no_choices() -> None:
    answer = message_response({"usage": {"prompt_tokens": 1, "completion_tokens": 0}}, model="m")
    assert answer["content"] == [] and answer["stop_reason"] == "end_turn"
    Message.model_validate(answer)


# ------------------------------------------------------------------------------------------ streams


def test_stream_text() -> None:  # conformance test 19
    sse, stream = run([*text_chunks("He", "llo", "!"), chunk(finish="stop"), usage_chunk(10, 3)])
    assert types(sse) == ["message_start", "content_block_start:text", "ping", "content_block_delta:text_delta",
                          "content_block_delta:text_delta", "content_block_delta:text_delta", "content_block_stop",
                          "message_delta", "message_stop"]
    all_events = events(sse)
    start = all_events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"] == stream.id
    assert start["usage"]["input_tokens"] > 0  # pitfall 7: an estimate, never 0
    assert all_events[1]["content_block"] == {"type": "text", "text": ""}
    assert {e["index"] for e in all_events if "index" in e} == {0}
    delta = all_events[-2]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 3, "input_tokens": 10, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0}
    final = sdk_final(sse)
    assert final.content[0].text == "Hello!"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.stop_reason) == (10, 3, "end_turn")
    assert (stream.stop_reason, stream.usage["completion_tokens"], stream.tokens.prompt) == ("end_turn", 3, 10)
    assert not stream.tokens.estimated


def test_stream_input_tokens_given() -> None:
    sse, _ = run(text_chunks("x"), input_tokens=321)
    assert events(sse)[0]["message"]["usage"]["input_tokens"] == 321


def test_empty_completion_has_no_blocks() -> None:  # decision (a)
    sse, _ = run([chunk({"role": "assistant", "content": ""}), chunk({"content": None}), chunk(finish="stop")])
    assert types(sse) == ["message_start", "message_delta", "message_stop"]
    assert sdk_final(sse).content == []


def test_stream_text_then_tool_use() -> None:  # conformance test 21
    sse, stream = run([*text_chunks("Checking"), *weather_call('{"ci', 'ty": "Pa', 'ris"}'),
                       chunk(finish="tool_calls"), usage_chunk()])
    assert types(sse) == ["message_start", "content_block_start:text", "ping", "content_block_delta:text_delta",
                          "content_block_stop", "content_block_start:tool_use", "content_block_delta:input_json_delta",
                          "content_block_stop", "message_delta", "message_stop"]
    tool_start = events(sse)[5]
    assert tool_start == {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "call_abc", "name": "get_weather", "input": {}}}
    assert events(sse)[6]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":"Paris"}'}
    assert events(sse)[-2]["delta"]["stop_reason"] == "tool_use"
    final = sdk_final(sse)
    assert final.content[-1].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    assert stream.stop_reason == "tool_use"


def test_stream_two_parallel_calls() -> None:
    sse, _ = run([chunk({"role": "assistant", "content": None}),
                  call(0, "", id="call_1", name="get_weather"), call(0, '{"city":'),
                  call(1, "", id="call_2", name="get_weather"), call(1, '{"city":'),
                  call(0, '"Paris"}'), call(1, '"Rome"}'),  # interleaved: buffering keeps each call whole
                  chunk(finish="tool_calls"), usage_chunk()])
    starts = [e for e in events(sse) if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["id"]) for e in starts] == [(0, "call_1"), (1, "call_2")]
    final = sdk_final(sse)
    assert [block.input for block in final.content] == [{"city": "Paris"}, {"city": "Rome"}]


def test_stream_arguments_char_by_char() -> None:
    arguments = '{"city": "Paris", "days": [1, 2, 3], "note": "a \\"quoted\\" word"}'
    sse, _ = run([*weather_call("", *arguments), chunk(finish="tool_calls")])
    deltas = [e for e in events(sse) if e["type"] == "content_block_delta"]
    assert len(deltas) == 1
    assert sdk_final(sse).content[0].input == orjson.loads(arguments)


def test_stream_arguments_with_id_and_name() -> None:  # pitfall 1: all in the first chunk
    sse, _ = run([call(0, '{"city":"Paris"}', id="call_abc", name="get_weather"), chunk(finish="tool_calls")])
    assert sdk_final(sse).content[0].input == {"city": "Paris"}


def test_stream_arguments_only_on_the_finish_chunk() -> None:  # pitfall 1
    last = call(0, '{"city":"Paris"}')
    last["choices"][0]["finish_reason"] = "tool_calls"
    sse, _ = run([call(0, "", id="call_abc", name="get_weather"), last])
    assert sdk_final(sse).content[0].input == {"city": "Paris"}


@pytest.mark.parametrize(("arguments", "expected"), [
    ({"city": "Paris"}, {"city": "Paris"}),  # an object instead of a string (pitfall 4)
    ("", {}),
    ("{not json", {}),
    ('{"city": "Par', {"city": "Par"}),
])
def test_stream_argument_quirks(arguments: Any, expected: dict[str, Any]) -> None:
    sse, _ = run([call(0, arguments, id="call_abc", name="get_weather"), chunk(finish="tool_calls")])
    deltas = [e["delta"]["partial_json"] for e in events(sse) if e["type"] == "content_block_delta"]
    assert [orjson.loads(d) for d in deltas] == [expected]  # always exactly one valid JSON object
    assert sdk_final(sse).content[0].input == expected


def test_stream_ollama_parallel_calls_all_at_index_zero() -> None:  # pitfall 4
    sse, _ = run([call(0, '{"city":"Paris"}', id="call_1", name="get_weather"),
                  call(0, '{"city":"Rome"}', id="call_2", name="get_weather"), chunk(finish="stop")])
    final = sdk_final(sse)
    assert [(b.id, b.input) for b in final.content] == [("call_1", {"city": "Paris"}), ("call_2", {"city": "Rome"})]
    assert final.stop_reason == "tool_use"  # the backend said stop


def test_stream_parallel_calls_at_index_zero_without_ids() -> None:
    sse, _ = run([call(0, '{"city":"Paris"}', name="get_weather"), call(0, '{"city":"Rome"}', name="get_weather"),
                  chunk(finish="tool_calls")])
    assert [b.input for b in sdk_final(sse).content] == [{"city": "Paris"}, {"city": "Rome"}]


def test_stream_ids_repeated_or_changed_per_chunk() -> None:  # pitfall 4: one call, whatever the ids say
    sse, _ = run([call(0, '{"ci', id="call_1", name="get_weather"), call(0, 'ty":', id="call_x"),
                  call(0, '"Paris"}', id="call_1"), chunk(finish="tool_calls")])
    final = sdk_final(sse)
    assert [(b.id, b.input) for b in final.content] == [("call_1", {"city": "Paris"})]


def test_stream_name_repeated_per_chunk() -> None:
    sse, _ = run([call(0, '{"ci', id="c", name="get_weather"), call(0, 'ty":"Paris"}', id="c", name="get_weather"),
                  chunk(finish="tool_calls")])
    assert [b.input for b in sdk_final(sse).content] == [{"city": "Paris"}]


def test_stream_tool_ids_sanitized_or_minted() -> None:
    sse, _ = run([call(0, "{}", id="functions.Bash:0", name="Bash"), call(1, "{}", name="Read"),
                  chunk(finish="tool_calls")])
    ids = [b.id for b in sdk_final(sse).content]
    assert ids[0] == "functions_Bash_0" and ids[1].startswith("toolu_")
    assert all(TOOL_ID.match(i) for i in ids)


def test_stream_content_and_finish_in_one_chunk() -> None:  # pitfall 2: fake streaming
    sse, _ = run([chunk({"role": "assistant", "content": "All at once"}, finish="stop")])
    assert sdk_final(sse).content[0].text == "All at once"


def test_stream_first_delta_of_a_new_block_is_kept() -> None:  # pitfall 2
    sse, _ = run([chunk({"reasoning_content": "hm"}), chunk({"content": "A"}), chunk({"content": "B"}),
                  chunk(finish="stop")], thinking=True)
    final = sdk_final(sse)
    assert final.content[0].thinking == "hm" and final.content[1].text == "AB"


def test_stream_usage_after_the_finish_chunk() -> None:  # pitfall 3
    stream = MessagesStream("m", request=chat(stream=True))
    sse = stream.start() + b"".join(stream.feed(c) for c in [*text_chunks("x"), chunk(finish="stop")])
    assert b"message_delta" not in sse  # held until finish(): usage is still to come
    sse += stream.feed(usage_chunk(20, 5))
    sse += stream.finish()
    assert events(sse)[-2]["usage"]["output_tokens"] == 5
    assert events(sse)[-2]["usage"]["input_tokens"] == 20
    assert events(sse)[-1]["type"] == "message_stop"
    # Nothing may follow message_stop.
    assert stream.feed(chunk({"content": "late"})) == b""
    assert stream.finish() == b""
    assert stream.error(GatewayError("backend_error", "x")) == b""


def test_stream_usage_on_the_finish_chunk() -> None:
    last = chunk(finish="stop")
    last["usage"] = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    sse, stream = run([*text_chunks("hi"), last])
    assert events(sse)[-2]["usage"]["output_tokens"] == 2
    assert stream.tokens.prompt == 8


def test_stream_openai_null_usage_is_ignored() -> None:
    chunks = [{**c, "usage": None} for c in [*text_chunks("hi"), chunk(finish="stop")]]
    _, stream = run([*chunks, usage_chunk(7, 1)])
    assert stream.tokens.completion == 1


def test_stream_without_usage_is_estimated() -> None:
    sse, stream = run([*text_chunks("Hello there, friend!"), chunk(finish="stop")])
    delta_usage = events(sse)[-2]["usage"]
    start_usage = events(sse)[0]["message"]["usage"]
    assert delta_usage["output_tokens"] > 0
    assert delta_usage["input_tokens"] == start_usage["input_tokens"] > 0
    assert stream.usage is None and stream.tokens.estimated
    assert stream.tokens.completion == stream.output_tokens > 0


def test_stream_usage_given_to_finish() -> None:
    stream = MessagesStream("m")
    sse = stream.start() + b"".join(stream.feed(c) for c in text_chunks("x"))
    sse += stream.finish({"prompt_tokens": 50, "completion_tokens": 9})
    assert events(sse)[-2]["usage"]["output_tokens"] == 9


def test_stream_cached_tokens() -> None:  # pitfall 8
    sse, stream = run([*text_chunks("x"), chunk(finish="stop"), usage_chunk(100, 4, cached=60)])
    usage = events(sse)[-2]["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (40, 60)
    final = sdk_final(sse).usage
    assert final.input_tokens + final.cache_read_input_tokens == 100
    assert (stream.tokens.prompt, stream.tokens.cached) == (100, 60)


@pytest.mark.parametrize(("last", "fields", "reason", "sequence"), [
    (chunk(finish="length"), {}, "max_tokens", None),
    (chunk(finish="content_filter"), {}, "refusal", None),
    (chunk(finish="stop", stop_reason="END"), {"stop_sequences": ["END"]}, "stop_sequence", "END"),
    (chunk(finish="stop", stop_reason=2), {"stop_sequences": ["END"]}, "end_turn", None),
])
def test_stream_stop_reasons(last: dict[str, Any], fields: dict[str, Any], reason: str,
                             sequence: str | None) -> None:  # conformance test 23, stream side
    sse, stream = run([*text_chunks("x"), last, usage_chunk(10, 16)], request=chat(stream=True, max_tokens=16,
                                                                                    **fields))
    assert events(sse)[-2]["delta"] == {"stop_reason": reason, "stop_sequence": sequence}
    assert (stream.stop_reason, stream.stop_sequence) == (reason, sequence)
    final = sdk_final(sse)
    assert (final.stop_reason, final.stop_sequence) == (reason, sequence)


def test_stream_refusal() -> None:
    sse, stream = run([chunk({"role": "assistant", "refusal": ""}), chunk({"refusal": "I can't help with that."}),
                       chunk(finish="stop")])
    final = sdk_final(sse)
    assert final.content[0].text == "I can't help with that." and final.stop_reason == "refusal"
    assert stream.stop_reason == "refusal"


def test_stream_context_window_exceeded() -> None:
    sse, _ = run([*text_chunks("x"), chunk(finish="length"), usage_chunk(4000, 5)],
                 request=chat(stream=True, max_tokens=64))
    assert events(sse)[-2]["delta"]["stop_reason"] == "model_context_window_exceeded"


def test_stream_thinking() -> None:
    chunks = [chunk({"role": "assistant", "reasoning_content": "Let me "}), chunk({"reasoning_content": "think."}),
              chunk({"content": "42"}), chunk(finish="stop")]
    sse, _ = run(chunks, thinking=True)
    assert types(sse) == ["message_start", "content_block_start:thinking", "ping",
                          "content_block_delta:thinking_delta", "content_block_delta:thinking_delta",
                          "content_block_delta:signature_delta", "content_block_stop", "content_block_start:text",
                          "content_block_delta:text_delta", "content_block_stop", "message_delta", "message_stop"]
    final = sdk_final(sse)
    assert (final.content[0].thinking, final.content[0].signature, final.content[1].text) == ("Let me think.", "",
                                                                                              "42")
    plain, _ = run(chunks)  # the client did not ask for thinking: no block, only the text
    assert [b.type for b in sdk_final(plain).content] == ["text"]


def test_stream_ollama_reasoning_name() -> None:
    sse, _ = run([chunk({"reasoning": "hm"}), chunk({"content": "ok"}), chunk(finish="stop")], thinking=True)
    assert [b.type for b in sdk_final(sse).content] == ["thinking", "text"]


def test_stream_error_mid_stream() -> None:  # conformance test 24 (f)
    stream = MessagesStream("m")
    sse = stream.start() + b"".join(stream.feed(c) for c in text_chunks("He", "llo"))
    sse += stream.error(GatewayError("backend_unreachable", "backend 'b' went away"))
    assert types(sse)[-2:] == ["content_block_stop", "error"]
    assert events(sse)[-1] == {"type": "error", "error": {"type": "api_error", "message": "backend 'b' went away"}}
    assert b"message_stop" not in sse
    assert stream.closed and stream.feed(chunk({"content": "x"})) == b"" and stream.finish() == b""
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk_final(sse)
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]


def test_stream_error_drops_buffered_calls() -> None:
    sse, stream = run(weather_call('{"ci'), finish=False)
    sse += stream.error(GatewayError("backend_timeout", "slow"))
    assert types(sse) == ["message_start", "error"]
    assert events(sse)[-1]["error"]["type"] == "timeout_error"


def test_stream_null_error_field_is_no_error() -> None:
    sse, _ = run([{**chunk({"content": "ok"}), "error": None}, chunk(finish="stop")])
    assert sdk_final(sse).content[0].text == "ok"


def test_stream_error_chunk_from_the_backend() -> None:
    stream = MessagesStream("m")
    sse = stream.start() + stream.feed(chunk({"content": "a"}))
    sse += stream.feed({"error": {"message": "CUDA out of memory", "type": "server_error", "code": 500}})
    assert events(sse)[-1]["error"] == {"type": "api_error", "message": "CUDA out of memory"}
    assert stream.closed


@pytest.mark.parametrize(("code", "kind"), [("no_healthy_backend", "overloaded_error"),
                                            ("backend_overloaded", "overloaded_error"),
                                            ("backend_timeout", "timeout_error"),
                                            ("rate_limit_exceeded", "rate_limit_error")])
def test_stream_error_types(code: str, kind: str) -> None:
    stream = MessagesStream("m")
    sse = stream.start() + stream.error(GatewayError(code, "x"))
    assert events(sse)[-1]["error"]["type"] == kind


def test_feed_before_start_starts() -> None:
    stream = MessagesStream("m")
    sse = stream.feed(chunk({"content": "x"})) + stream.finish()
    assert types(sse)[:3] == ["message_start", "content_block_start:text", "ping"]
    assert stream.start() == b""


def test_streams_share_no_state() -> None:  # pitfall 2: no class-level mutable defaults
    one, two = MessagesStream("a"), MessagesStream("b")
    sse_one = one.start() + one.feed(call(0, '{"x":1}', id="c1", name="f"))
    sse_two = two.start() + two.feed(chunk({"content": "text"}))
    sse_one += one.finish()
    sse_two += two.finish()
    assert [b.type for b in sdk_final(sse_one).content] == ["tool_use"]
    assert [b.type for b in sdk_final(sse_two).content] == ["text"]
    assert one.id != two.id


def test_ping_while_arguments_are_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(itertools.count(0.0, 10.0))
    monkeypatch.setattr(messages_stream.time, "monotonic", lambda: next(clock))
    stream = MessagesStream("m")
    stream.start()
    sent = [stream.feed(c) for c in weather_call('{"ci', 'ty"', ': "Paris"}', "")]
    assert sent[0] == b"" and all(s in (b"", b"event: ping\ndata: {\"type\":\"ping\"}\n\n") for s in sent)
    assert any(sent)


def test_choices_other_than_the_first_are_ignored() -> None:
    extra = chunk({"content": "other"})
    extra["choices"][0]["index"] = 1
    sse, _ = run([*text_chunks("mine"), extra, chunk(finish="stop")])
    assert sdk_final(sse).content[0].text == "mine"


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (405, "invalid_request_error"), (409, "conflict_error"),
    (413, "request_too_large"), (422, "invalid_request_error"), (429, "rate_limit_error"), (500, "api_error"),
    (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error"),
])
def test_error_type(status: int, kind: str) -> None:
    assert error_type(status) == kind


def test_a_lost_backend_mid_stream_is_a_broken_answer() -> None:
    err = GatewayError("backend_unreachable", "connection to backend 'b' failed")
    assert error_status(err) == 529 and error_status(err, answered=True) == 500


@pytest.mark.parametrize(("code", "status", "kind", "exception"), [
    ("invalid_value", 400, "invalid_request_error", anthropic.BadRequestError),
    ("missing_field", 400, "invalid_request_error", anthropic.BadRequestError),
    ("context_length_exceeded", 400, "invalid_request_error", anthropic.BadRequestError),
    ("invalid_api_key", 401, "authentication_error", anthropic.AuthenticationError),
    ("model_not_allowed", 403, "permission_error", anthropic.PermissionDeniedError),
    ("model_not_found", 404, "not_found_error", anthropic.NotFoundError),
    ("body_too_large", 413, "request_too_large", anthropic.APIStatusError),
    ("rate_limit_exceeded", 429, "rate_limit_error", anthropic.RateLimitError),
    ("budget_exceeded", 429, "rate_limit_error", anthropic.RateLimitError),
    ("unsupported", 400, "invalid_request_error", anthropic.BadRequestError),
    ("internal_error", 500, "api_error", anthropic.InternalServerError),
    ("backend_error", 500, "api_error", anthropic.InternalServerError),
    ("backend_unreachable", 529, "overloaded_error", anthropic.OverloadedError),  # down, spec §4.4
    ("no_healthy_backend", 529, "overloaded_error", anthropic.OverloadedError),
    ("backend_overloaded", 529, "overloaded_error", anthropic.OverloadedError),
    ("backend_timeout", 504, "timeout_error", anthropic.InternalServerError),
])
def test_error_bodies_through_the_sdk(code: str, status: int, kind: str,
                                      exception: type[Exception]) -> None:  # conformance test 24
    err = GatewayError(code, "something went wrong")
    assert error_status(err) == status
    raw = error_body(err, "req_abc")
    assert orjson.loads(raw) == {"type": "error", "error": {"type": kind, "message": error_message(err)},
                                 "request_id": "req_abc"}
    assert error_message(err).endswith("something went wrong")
    with pytest.raises(exception) as caught:
        client(status, raw).messages.create(**body())
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    assert caught.value.body["error"]["type"] == kind  # type: ignore[attr-defined]


def test_error_body_without_request_id() -> None:
    assert orjson.loads(error_body(GatewayError("invalid_value", "bad"))) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}


@pytest.mark.parametrize(("message", "expected"), [
    ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
     "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
     "prompt is too long: 5000 tokens > 4096 maximum"),
    ("This model's maximum context length is 2048 tokens. However, your request has 3000 input tokens.",
     "prompt is too long: 3000 tokens > 2048 maximum"),
    ("the request exceeds the available context size, try increasing it",
     "prompt is too long: the request exceeds the available context size, try increasing it"),
    ("prompt is too long: 10 tokens > 5 maximum", "prompt is too long: 10 tokens > 5 maximum"),
])
def test_context_length_in_anthropic_words(message: str, expected: str) -> None:
    err = GatewayError("context_length_exceeded", message)
    assert error_message(err) == expected
    assert orjson.loads(error_body(err))["error"] == {"type": "invalid_request_error", "message": expected}
    stream = MessagesStream("m")
    assert events(stream.start() + stream.error(err))[-1]["error"]["message"] == expected


def test_other_messages_are_kept() -> None:
    assert error_message(GatewayError("invalid_value", "maximum context length is 5")) == "maximum context length is 5"


def test_upstream_status_is_kept() -> None:
    err = GatewayError("backend_error", "teapot", status=418)
    assert error_status(err) == 418
    assert orjson.loads(error_body(err))["error"]["type"] == "invalid_request_error"
