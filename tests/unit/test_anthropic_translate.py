"""OpenAI chat <-> a remote Anthropic Messages backend, without a network (spec §5, reverse direction).

Answers and stream chunks are read back with the official openai SDK's types and stream accumulator.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from appliance.api.messages import request as messages_request_side
from appliance.api.messages import stream as messages_stream
from appliance.api.messages import translate as messages_translate
from appliance.common.errors import GatewayError
from appliance.providers.anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    ChatStream,
    chat_error,
    chat_response,
    chat_usage,
    finish_reason,
    messages_request,
    stream_error,
)

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": SCHEMA}}


def request(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return messages_request({"model": "claude-x", "messages": list(messages or [{"role": "user", "content": "Hi"}]),
                             **fields})


def invalid(*messages: dict[str, Any], **fields: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        request(*messages, **fields)
    assert caught.value.status == 400
    return caught.value


def calls(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        for call_id, arguments in pairs]}


# ------------------------------------------------------------------------------------------ requests


def test_minimal_request() -> None:
    assert request() == {"model": "claude-x", "max_tokens": DEFAULT_MAX_TOKENS,
                         "messages": [{"role": "user", "content": "Hi"}], "stream": False}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 50}, 50),
    ({"max_tokens": 100, "max_completion_tokens": 50}, 50),
    ({"max_tokens": None}, DEFAULT_MAX_TOKENS),
])
def test_max_tokens(fields: dict[str, Any], expected: int) -> None:
    assert request(**fields)["max_tokens"] == expected


def test_system_and_developer_are_hoisted() -> None:
    out = request({"role": "system", "content": "A"}, {"role": "developer", "content": [{"type": "text", "text": "B"}]},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "system", "content": "C"}, {"role": "user", "content": "Again"})
    assert out["system"] == "A\nB\nC"
    assert out["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                               {"role": "user", "content": "Again"}]


def test_tool_round_trip() -> None:  # the mirror of conformance test 22
    out = request({"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": "Checking", "tool_calls": calls(("call_1", '{"city":"Paris"}'),
                                                                                   ("call_2", ""))["tool_calls"]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                  {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
                  {"role": "user", "content": "thanks"})
    assert out["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking"},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "rainy"},
            {"type": "text", "text": "thanks"}]},
    ]


def test_tool_results_open_the_user_turn() -> None:  # pitfall 5, Anthropic side
    out = request({"role": "user", "content": "go"}, calls(("c1", "{}")), {"role": "user", "content": "note"},
                  {"role": "tool", "tool_call_id": "c1", "content": "done"})
    assert [b["type"] for b in out["messages"][-1]["content"]] == ["tool_result", "text"]


def test_empty_tool_result_has_no_content() -> None:
    out = request({"role": "user", "content": "go"}, calls(("c1", "{}")), {"role": "tool", "tool_call_id": "c1",
                                                                           "content": ""})
    assert out["messages"][-1] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1"}]}


def test_tool_call_arguments_as_an_object() -> None:
    out = request({"role": "user", "content": "go"}, calls(("c1", {"city": "Rome"})),
                  {"role": "tool", "tool_call_id": "c1", "content": "ok"})
    assert out["messages"][1]["content"][0]["input"] == {"city": "Rome"}


def test_same_roles_merge_and_empty_turns_go() -> None:
    out = request({"role": "user", "content": "a"}, {"role": "user", "content": ""},
                  {"role": "user", "content": [{"type": "text", "text": "b"}]}, {"role": "assistant", "content": ""},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
                  {"role": "assistant", "content": [{"type": "text", "text": "e"},
                                                    {"type": "refusal", "refusal": "f"}]})
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                                     {"type": "text", "text": "c"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "d"}, {"type": "text", "text": "e"},
                                          {"type": "text", "text": "f"}]}]


def test_reasoning_is_not_sent_back() -> None:
    out = request({"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a", "reasoning_content": "hm"}, {"role": "user", "content": "q2"})
    assert out["messages"][1] == {"role": "assistant", "content": "a"}


def test_prefill_loses_trailing_whitespace() -> None:
    out = request({"role": "user", "content": "Pick"}, {"role": "assistant", "content": "The answer is ( \n"})
    assert out["messages"][-1] == {"role": "assistant", "content": "The answer is ("}
    out = request({"role": "user", "content": "Pick"}, {"role": "assistant", "content": "  "})
    assert out["messages"] == [{"role": "user", "content": "Pick"}]


def test_images() -> None:
    out = request({"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AA", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]})
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/AA"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.png"}}]


def test_sampling_and_other_fields() -> None:
    out = request(temperature=1.5, top_p=0.9, top_k=20, stop="END", user="u-1", seed=3, logprobs=True,
                  frequency_penalty=0.5, stream=True, stream_options={"include_usage": True})
    assert out == {"model": "claude-x", "max_tokens": DEFAULT_MAX_TOKENS,
                   "messages": [{"role": "user", "content": "Hi"}], "temperature": 1.0, "top_p": 0.9, "top_k": 20,
                   "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}, "stream": True}
    assert request(temperature=0.3)["temperature"] == 0.3
    assert request(temperature=-1)["temperature"] == 0.0
    assert request(stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert "stop_sequences" not in request(stop=[])


def test_tools() -> None:
    out = request(tools=[TOOL, {"type": "function", "function": {"name": "noop"}}])
    assert out["tools"] == [{"name": "get_weather", "description": "Weather now", "input_schema": SCHEMA},
                            {"name": "noop", "input_schema": {"type": "object", "properties": {}}}]
    assert "tool_choice" not in out


@pytest.mark.parametrize(("fields", "expected"), [
    ({"tool_choice": "auto"}, None),
    ({"tool_choice": "required"}, {"type": "any"}),
    ({"tool_choice": "none"}, {"type": "none"}),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     {"type": "tool", "name": "get_weather"}),
    ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
    ({"tool_choice": "required", "parallel_tool_calls": False}, {"type": "any", "disable_parallel_tool_use": True}),
    ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}),
    ({"parallel_tool_calls": True}, None),
])
def test_tool_choice(fields: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert request(tools=[TOOL], **fields).get("tool_choice") == expected


def test_tool_choice_without_tools_is_dropped() -> None:
    assert "tool_choice" not in request(tool_choice="required")


def test_response_format() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    out = request(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "output_config" not in request(response_format={"type": "json_object"})
    assert "output_config" not in request(response_format={"type": "text"})


@pytest.mark.parametrize(("messages", "fields", "param"), [
    (["x"], {}, "messages.[0]"),
    ([{"role": "function", "name": "f", "content": "x"}], {}, "messages.[0].role"),
    ([{"role": "user", "content": 5}], {}, "messages.[0].content"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], {}, "messages.[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}], {},
     "messages.[0].content"),
    ([{"role": "system", "content": [{"type": "image_url"}]}], {}, "messages.[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "audio"}]}], {},
     "messages.[1].content"),
    ([{"role": "user", "content": "a"}, calls(("c1", "{oops"))], {}, "messages.[1].tool_calls"),
    ([{"role": "user", "content": "a"}, calls(("c1", "[1]"))], {}, "messages.[1].tool_calls"),
    ([{"role": "user", "content": "a"}, calls(("", "{}"))], {}, "messages.[1].tool_calls"),
    ([{"role": "tool", "content": "x"}], {}, "messages.[0].tool_call_id"),
    ([{"role": "user", "content": "a"}], {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.[0]"),
    ([{"role": "user", "content": "a"}], {"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ([{"role": "user", "content": "a"}], {"response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format.json_schema"),
    ([{"role": "user", "content": "a"}], {"n": 2}, "n"),
])
def test_invalid_requests(messages: list[Any], fields: dict[str, Any], param: str) -> None:
    assert invalid(*messages, **fields).param == param


def test_messages_must_be_a_list() -> None:
    with pytest.raises(GatewayError) as caught:
        messages_request({"model": "m", "messages": "hi"})
    assert caught.value.param == "messages"


def test_anthropic_request_to_chat_and_back() -> None:
    """A Messages body through appliance/api/messages/ and back here keeps its meaning."""
    original = {"model": "claude-x", "max_tokens": 100, "system": "S", "temperature": 0.5, "stop_sequences": ["END"],
                "metadata": {"user_id": "u"}, "tools": [{"name": "get_weather", "input_schema": SCHEMA}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Checking"},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                                                 {"type": "text", "text": "and tomorrow?"}]}]}
    back = messages_request(messages_request_side.chat_request(original))
    assert back == {**original, "stream": False}


# ------------------------------------------------------------------------------------------ answers


def message(*content: dict[str, Any], stop_reason: str | None = "end_turn", stop_sequence: str | None = None,
            usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": list(content),
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": usage or {"input_tokens": 10, "output_tokens": 3}}


def test_text_answer() -> None:
    answer = chat_response(message({"type": "text", "text": "Hello!"}), model="alias")
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert answer["model"] == "alias"
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                                  "logprobs": None, "finish_reason": "stop"}]
    assert answer["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    ChatCompletion.model_validate(answer)


def test_tool_use_answer() -> None:
    answer = chat_response(message({"type": "text", "text": "Checking"},
                                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                    "input": {"city": "Paris"}},
                                   {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
                                   stop_reason="tool_use"), model="m")
    reply = answer["choices"][0]["message"]
    assert reply["content"] == "Checking"
    assert reply["tool_calls"] == [{"id": "toolu_1", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    parsed = ChatCompletion.model_validate(answer)
    assert orjson.loads(parsed.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_tool_use_only_has_null_content() -> None:
    answer = chat_response(message({"type": "tool_use", "id": "t", "name": "f", "input": {}}, stop_reason="tool_use"),
                           model="m")
    assert answer["choices"][0]["message"]["content"] is None
    assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_thinking_answer() -> None:
    answer = chat_response(message({"type": "thinking", "thinking": "hm", "signature": "sig"},
                                   {"type": "redacted_thinking", "data": "x"}, {"type": "text", "text": "42"}),
                           model="m")
    reply = answer["choices"][0]["message"]
    assert (reply["content"], reply["reasoning_content"], reply["reasoning"]) == ("42", "hm", "hm")


@pytest.mark.parametrize(("stop_reason", "tools", "finish"), [
    ("end_turn", False, "stop"), ("stop_sequence", False, "stop"), ("pause_turn", False, "stop"),
    ("max_tokens", False, "length"), ("model_context_window_exceeded", False, "length"),
    ("tool_use", True, "tool_calls"), ("end_turn", True, "tool_calls"), ("max_tokens", True, "length"),
    ("refusal", False, "content_filter"), (None, False, "stop"), ("something_new", False, "stop"),
])
def test_finish_reason(stop_reason: str | None, tools: bool, finish: str) -> None:
    assert finish_reason(stop_reason, tools) == finish


def test_stop_sequence_survives() -> None:
    answer = chat_response(message({"type": "text", "text": "x"}, stop_reason="stop_sequence", stop_sequence="END"),
                           model="m")
    assert answer["choices"][0]["stop_reason"] == "END"
    back = messages_translate.message_response(answer, model="m")
    assert (back["stop_reason"], back["stop_sequence"]) == ("stop_sequence", "END")


def test_usage_with_cache() -> None:
    usage = {"input_tokens": 10, "cache_read_input_tokens": 60, "cache_creation_input_tokens": 30, "output_tokens": 5}
    assert chat_usage(usage) == {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                                 "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30}}
    # And back through the Messages surface: the three input counts are what Anthropic said.
    back = messages_translate.anthropic_usage(chat_usage(usage))
    assert back == {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 60,
                    "cache_creation_input_tokens": 30}


def test_usage_missing_or_null() -> None:
    assert chat_usage(None)["total_tokens"] == 0
    assert chat_usage({"input_tokens": 4, "output_tokens": None, "cache_read_input_tokens": None}) == {
        "prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}


# ------------------------------------------------------------------------------------------ streams


def frames(transcript: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an Anthropic SSE transcript into (event, data) pairs."""
    out = []
    for frame in transcript.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.strip().splitlines())
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


# [APY] tests/lib/streaming/fixtures/tool_use_response.txt, as quoted in the spec (§4.5).
TOOL_USE_TRANSCRIPT = """
event: message_start
data: {"type":"message_start","message":{"id":"msg_019Q1hrJbZG26Fb9BQhrkHEr","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":377,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1,"service_tier":"standard"}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"I"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"'ll check the current weather in Paris for you."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01NRLabsLyVHZPKxbKvkfSMn","name":"get_weather","caller":{"type":"direct"},"input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"locati"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"on\\": \\"P"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ar"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"is\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":65}}

event: message_stop
data: {"type":"message_stop"}
"""  # noqa: E501

TEXT_TRANSCRIPT = [
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 8,
                                         "cache_creation_input_tokens": 0}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": 2, "input_tokens": None}}),
    ("message_stop", {"type": "message_stop"}),
]


def translate(events: list[tuple[str, dict[str, Any]]], **options: Any) -> tuple[list[dict[str, Any]], ChatStream]:
    stream = ChatStream("alias", **options)
    out = b"".join(stream.feed(name, data) for name, data in events)
    chunks = []
    if out:
        assert out.endswith(b"\n\n") and b"[DONE]" not in out
        for frame in out[:-2].split(b"\n\n"):
            assert frame.startswith(b"data: ")
            chunks.append(orjson.loads(frame[6:]))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    return chunks, stream


def accumulate(chunks: list[dict[str, Any]]) -> Any:
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


def test_stream_reference_tool_use_transcript() -> None:
    chunks, stream = translate(frames(TOOL_USE_TRANSCRIPT))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["id"] == chunks[0]["id"] and c["model"] == "alias" for c in chunks)
    tool_deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                   if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert tool_deltas[0] == {"index": 0, "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    assert all(set(d) == {"index", "function"} for d in tool_deltas[1:])  # the empty fragment is not sent
    assert len(tool_deltas) == 5
    final = accumulate(chunks)
    choice = final.choices[0]
    assert choice.message.content == "I'll check the current weather in Paris for you."
    assert choice.message.tool_calls[0].id == "toolu_01NRLabsLyVHZPKxbKvkfSMn"
    assert orjson.loads(choice.message.tool_calls[0].function.arguments) == {"location": "Paris"}
    assert choice.finish_reason == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 377
    assert chunks[-1]["usage"]["completion_tokens"] == 65
    assert stream.done and stream.finish_reason == "tool_calls"


def test_stream_text_with_usage() -> None:
    chunks, stream = translate(TEXT_TRANSCRIPT)
    assert [c["choices"][0]["delta"] for c in chunks[:-2]] == [{"role": "assistant", "content": ""},
                                                               {"content": "Hello"}, {"content": "!"}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    # input_tokens null in message_delta keeps what message_start said; cache reads count as prompt tokens.
    assert chunks[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22,
                                   "prompt_tokens_details": {"cached_tokens": 8}}
    assert accumulate(chunks).choices[0].message.content == "Hello!"
    assert stream.usage["output_tokens"] == 2


def test_stream_without_usage_chunk() -> None:
    chunks, _ = translate(TEXT_TRANSCRIPT, include_usage=False)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"] for c in chunks)


def test_stream_two_tool_calls() -> None:
    events = [TEXT_TRANSCRIPT[0]]
    for block, (call_id, city) in enumerate([("toolu_a", "Paris"), ("toolu_b", "Rome")]):
        events += [
            ("content_block_start", {"type": "content_block_start", "index": block, "content_block": {
                "type": "tool_use", "id": call_id, "name": "get_weather", "input": {}}}),
            ("content_block_delta", {"type": "content_block_delta", "index": block, "delta": {
                "type": "input_json_delta", "partial_json": '{"city": '}}),
            ("content_block_delta", {"type": "content_block_delta", "index": block, "delta": {
                "type": "input_json_delta", "partial_json": f'"{city}"}}'}}),
            ("content_block_stop", {"type": "content_block_stop", "index": block})]
    events += [("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                  "usage": {"output_tokens": 30}}), ("message_stop", {"type": "message_stop"})]
    chunks, _ = translate(events)
    final = accumulate(chunks).choices[0]
    assert [(c.id, orjson.loads(c.function.arguments)) for c in final.message.tool_calls] == [
        ("toolu_a", {"city": "Paris"}), ("toolu_b", {"city": "Rome"})]
    assert final.finish_reason == "tool_calls"


def test_stream_thinking() -> None:
    events = [TEXT_TRANSCRIPT[0],
              ("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "thinking_delta", "thinking": "hm"}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "signature_delta", "signature": "EqQB"}}),
              ("content_block_stop", {"type": "content_block_stop", "index": 0}),
              ("content_block_start", {"type": "content_block_start", "index": 1,
                                       "content_block": {"type": "text", "text": ""}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 1,
                                       "delta": {"type": "text_delta", "text": "42"}}),
              ("content_block_stop", {"type": "content_block_stop", "index": 1}),
              *TEXT_TRANSCRIPT[-2:]]
    chunks, _ = translate(events)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert {"reasoning_content": "hm", "reasoning": "hm"} in deltas
    assert accumulate(chunks).choices[0].message.content == "42"


def test_stream_stop_sequence_and_max_tokens() -> None:
    events = [*TEXT_TRANSCRIPT[:-2],
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "stop_sequence",
                                                                    "stop_sequence": "END"},
                                 "usage": {"output_tokens": 2}}), TEXT_TRANSCRIPT[-1]]
    chunks, _ = translate(events)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"][0]["stop_reason"] == "END"
    events[-2][1]["delta"] = {"stop_reason": "max_tokens", "stop_sequence": None}
    chunks, _ = translate(events)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "stop_reason" not in chunks[-2]["choices"][0]


def test_stream_ignores_pings_unknown_events_and_server_tools() -> None:
    events = [TEXT_TRANSCRIPT[0], ("ping", {"type": "ping"}), ("future_event", {"type": "future_event"}),
              ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
                  "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
              ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                  "type": "input_json_delta", "partial_json": '{"query": "x"}'}}),
              ("content_block_stop", {"type": "content_block_stop", "index": 0}),
              ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                  "type": "citations_delta", "citation": {}}}),
              *TEXT_TRANSCRIPT[-2:]]
    chunks, _ = translate(events)
    assert len(chunks) == 3  # role, finish, usage
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"


def test_stream_nothing_after_message_stop() -> None:
    stream = ChatStream("m")
    for name, data in TEXT_TRANSCRIPT:
        stream.feed(name, data)
    assert stream.feed(*TEXT_TRANSCRIPT[2]) == b""


def test_stream_event_name_from_data() -> None:
    chunks, _ = translate([(None, data) for _, data in TEXT_TRANSCRIPT])  # type: ignore[misc]
    assert accumulate(chunks).choices[0].message.content == "Hello!"


def test_stream_error_event_raises() -> None:
    stream = ChatStream("m")
    stream.feed(*TEXT_TRANSCRIPT[0])
    with pytest.raises(GatewayError) as caught:
        stream.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert (caught.value.code, caught.value.status, caught.value.message) == ("backend_overloaded", 503, "Overloaded")
    assert caught.value.headers["Retry-After"]


def test_stream_error_from_an_unknown_body() -> None:
    assert stream_error({}).status == 500


# ------------------------------------------------------------------------------------------ errors


def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize(("status", "body", "code", "mapped", "kind", "param"), [
    (400, anthropic_error("invalid_request_error", "messages.0.content: Field required"), "invalid_value", 400,
     "invalid_request_error", None),
    (400, anthropic_error("invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
     "context_length_exceeded", 400, "invalid_request_error", None),
    (401, anthropic_error("authentication_error", "invalid x-api-key"), "backend_error", 502, "server_error", None),
    (403, anthropic_error("permission_error", "no access"), "backend_error", 502, "server_error", None),
    (402, anthropic_error("billing_error", "credit balance too low"), "backend_error", 502, "server_error", None),
    (404, anthropic_error("not_found_error", "model: claude-nope"), "model_not_found", 404, "invalid_request_error",
     "model"),
    (404, anthropic_error("not_found_error", "Not found"), "not_found", 404, "invalid_request_error", None),
    (413, anthropic_error("request_too_large", "Request exceeds the maximum size"), "body_too_large", 413,
     "invalid_request_error", None),
    (429, anthropic_error("rate_limit_error", "slow down"), "rate_limit_exceeded", 429, "rate_limit_error", None),
    (500, anthropic_error("api_error", "Internal server error"), "backend_error", 500, "server_error", None),
    (529, anthropic_error("overloaded_error", "Overloaded"), "backend_overloaded", 503, "server_error", None),
    (504, anthropic_error("timeout_error", "timed out"), "backend_timeout", 504, "server_error", None),
    (409, anthropic_error("conflict_error", "conflict"), "backend_error", 502, "server_error", None),
    (502, b"<html>Bad gateway</html>", "backend_error", 502, "server_error", None),
    (503, b"", "backend_overloaded", 503, "server_error", None),
    (401, b"unauthorized", "backend_error", 502, "server_error", None),
])
def test_chat_error(status: int, body: bytes, code: str, mapped: int, kind: str, param: str | None) -> None:
    err = chat_error(status, body)
    assert (err.code, err.status, err.type, err.param) == (code, mapped, kind, param)
    envelope = err.envelope()["error"]
    assert set(envelope) == {"message", "type", "param", "code"}
    assert envelope["message"]


def test_chat_error_messages() -> None:
    assert chat_error(500, b"").message == "Anthropic answered HTTP 500"
    assert chat_error(502, b"<html>Bad gateway</html>").message == "<html>Bad gateway</html>"
    assert "invalid x-api-key" in chat_error(401, anthropic_error("authentication_error", "invalid x-api-key")).message


def test_chat_error_retry_after() -> None:
    err = chat_error(429, anthropic_error("rate_limit_error", "slow down"), headers={"retry-after": "7"})
    assert err.headers["Retry-After"] == "7"
    assert "Retry-After" not in chat_error(429, anthropic_error("rate_limit_error", "x")).headers
    assert chat_error(529, anthropic_error("overloaded_error", "x"), headers={"Retry-After": "3"}).headers[
        "Retry-After"] == "3"


@pytest.mark.parametrize(("status", "body", "exception"), [
    (400, anthropic_error("invalid_request_error", "bad"), openai.BadRequestError),
    (404, anthropic_error("not_found_error", "model: claude-nope"), openai.NotFoundError),
    (429, anthropic_error("rate_limit_error", "slow"), openai.RateLimitError),
    (529, anthropic_error("overloaded_error", "Overloaded"), openai.InternalServerError),
    (401, anthropic_error("authentication_error", "bad key"), openai.InternalServerError),
])
def test_chat_errors_through_the_openai_sdk(status: int, body: bytes, exception: type[Exception]) -> None:
    err = chat_error(status, body)

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(err.status, content=err.json_body("req_1"), headers={"content-type": "application/json"})

    client = openai.OpenAI(api_key="k", base_url="http://gateway.test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == err.code  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ both ways


def test_anthropic_stream_through_chat_and_back() -> None:
    """Anthropic SSE -> chat chunks (here) -> Anthropic SSE (api/messages/stream.py): the SDK sees the same answer."""
    chunks, _ = translate(frames(TOOL_USE_TRANSCRIPT))
    stream = messages_stream.MessagesStream("claude-x")
    sse = stream.start() + b"".join(stream.feed(c) for c in chunks) + stream.finish()

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    import anthropic

    client = anthropic.Anthropic(api_key="k", base_url="http://gateway.test", max_retries=0,
                                 http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    with client.messages.stream(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        final = s.get_final_message()
    assert final.content[0].text == "I'll check the current weather in Paris for you."
    assert (final.content[1].id, final.content[1].input) == ("toolu_01NRLabsLyVHZPKxbKvkfSMn", {"location": "Paris"})
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == ("tool_use", 377, 65)


# ------------------------------------------------------------------------------------------ robustness

GARBAGE = [None, 0, 1.5, True, "", "x", [], [None], {}, {"type": None}, {"type": []}, {"type": "text"},
           {"type": "function"}, {"function": None}, [{"type": "text", "text": None}]]


@pytest.mark.parametrize("value", GARBAGE, ids=repr)
def test_garbage_requests_raise_gateway_errors_only(value: Any) -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "a"}, calls(("c1", "{}")),
                                       {"role": "tool", "tool_call_id": "c1", "content": "r"}],
            "tools": [TOOL], "tool_choice": "auto"}
    variants = [{**base, key: value} for key in ("messages", "tools", "tool_choice", "stop", "response_format")]
    for i in range(3):
        for key in ("role", "content", "tool_calls", "tool_call_id"):
            messages = [dict(m) for m in base["messages"]]
            messages[i][key] = value
            variants.append({**base, "messages": messages})
        messages = [dict(m) for m in base["messages"]]
        messages[i] = value
        variants.append({**base, "messages": messages})
    for variant in variants:
        try:
            messages_request(variant)
        except GatewayError as err:
            assert err.status == 400


@pytest.mark.parametrize("value", GARBAGE, ids=repr)
def test_garbage_events_are_ignored(value: Any) -> None:
    stream = ChatStream("m")
    for kind in ("message_start", "content_block_start", "content_block_delta", "message_delta"):
        for key in ("message", "content_block", "delta", "index", "usage"):
            stream.feed(kind, {"type": kind, key: value})
    stream.feed("message_stop", {"type": "message_stop"})
    assert stream.done
    assert chat_response({"content": [value], "stop_reason": value, "usage": value}, model="m")["object"] == \
        "chat.completion"
