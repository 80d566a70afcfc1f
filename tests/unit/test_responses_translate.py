"""The Responses <-> chat completions translation, without a network (spec-responses-messages.md §1 to §3, §6).

Every Response object and stream event is checked against OpenAI's published OpenAPI spec and parsed by
the official SDK: its event union, and its own stream accumulator fed through an in-process transport.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from appliance.api.responses.items import chat_messages, history_items, input_items
from appliance.api.responses.stream import ResponsesStream, sse, ws_request
from appliance.api.responses.translate import (
    chat_request,
    dropped_tools,
    error_body,
    previous_not_found,
    response_object,
    response_skeleton,
    response_usage,
    ws_error_frame,
)
from appliance.common.errors import GatewayError
from tests.support.openapi import validate

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.refusal.delta": "ResponseRefusalDeltaEvent",
    "response.refusal.done": "ResponseRefusalDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.custom_tool_call_input.delta": "ResponseCustomToolCallInputDeltaEvent",
    "response.custom_tool_call_input.done": "ResponseCustomToolCallInputDoneEvent",
}
EVENTS = TypeAdapter(ResponseStreamEvent)
ITEMS = TypeAdapter(ResponseItem)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER}
PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "Apply a patch"}


def req(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **fields}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}], **extra}


def usage_chunk(prompt: int = 10, completion: int = 3) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def tool_delta(index: int, *, id: str | None = None, name: str | None = None, args: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    entry: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        entry |= {"id": id, "type": "function"}
    return {"tool_calls": [entry]}


def completion(message: dict[str, Any], finish: str = "stop", usage: Any = None, **choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "backend-model",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
            "usage": usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 3,
                                                      "total_tokens": 13}}


def check_response(response: dict[str, Any]) -> Response:
    """Valid by the published schema and by the SDK's model; JSON-serialisable as is."""
    validate(response, "Response")
    orjson.dumps(response)
    return Response.model_validate(response)


def run(chunks: list[dict[str, Any]], request: dict[str, Any] | None = None, *,
        usage: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], ResponsesStream]:
    stream = ResponsesStream(request or req(stream=True), response_id="resp_test", created_at=1700000000)
    events = stream.start()
    for c in chunks:
        events += stream.feed(c)
    events += stream.finish(usage)
    check_events(events)
    return events, stream


def check_events(events: list[dict[str, Any]]) -> None:
    """The §1.5 invariants, the spec schema of each event, and the SDK's parse of each."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    terminal = [e for e in events if e["type"] in ("response.completed", "response.incomplete", "response.failed")]
    assert terminal == [events[-1]]
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    added: dict[int, str] = {}
    open_index = None
    for event in events:
        validate(event, EVENT_SCHEMAS[event["type"]])
        EVENTS.validate_python(event)
        if event["type"] == "response.output_item.added":
            assert open_index is None, "items must not interleave"
            assert event["output_index"] == len(added), "output_index is dense, in order of added"
            added[event["output_index"]] = event["item"]["id"]
            open_index = event["output_index"]
        elif event["type"] == "response.output_item.done":
            assert event["output_index"] == open_index
            assert event["item"]["id"] == added[open_index]
            open_index = None
        elif "item_id" in event:
            assert event["output_index"] == open_index
            assert event["item_id"] == added[open_index]
    assert open_index is None
    final = events[-1]["response"]
    assert [item["id"] for item in final["output"]] == [added[i] for i in range(len(added))]
    check_response(final)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


def sdk_client(payload: bytes, content_type: str) -> tuple[openai.OpenAI, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-type": content_type}, content=payload)

    client = openai.OpenAI(api_key="k", base_url="http://gateway.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    return client, seen


def sdk_stream(events: list[dict[str, Any]], **params: Any) -> Any:
    """The official SDK's stream helper over our SSE bytes: its accumulator asserts the §1.5 ordering."""
    client, _ = sdk_client(b"".join(sse(e) for e in events), "text/event-stream")
    with client.responses.stream(**{"model": "m", "input": "hi", **params}) as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen[-1] == events[-1]["type"]
    return final


def without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in ("id", "item_id", "call_id")}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ requests


def test_string_input_is_one_user_message() -> None:
    assert chat_request(req(input="Say hi"), []) == {"model": "m", "messages": [{"role": "user", "content": "Say hi"}],
                                                     "stream": False}


def test_input_mapping_of_roles_parts_and_sampling() -> None:
    body = req(
        input=[{"role": "developer", "content": "D"},
               {"type": "message", "role": "user", "content": [
                   {"type": "input_text", "text": "look"},
                   {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
               {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "again"}],
        instructions="I", temperature=0.2, top_p=0.9, max_output_tokens=64, metadata={"k": "v"}, store=False,
        user="u1", truncation="disabled", include=["reasoning.encrypted_content"], service_tier="auto",
        some_future_field={"x": 1})
    out = chat_request(body, [])
    assert out == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "I"},
            {"role": "system", "content": "D"},
            {"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                             "detail": "low"}}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
        "stream": False, "temperature": 0.2, "top_p": 0.9, "max_tokens": 64,
    }


def test_text_parts_collapse_to_a_string_and_images_keep_only_chat_details() -> None:
    out = chat_request(req(input=[
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png", "detail": "original"}]},
        {"role": "system", "content": [{"type": "input_text", "text": "s"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "x", "annotations": []},
                                          {"type": "refusal", "refusal": "no"}]},
    ]), [])
    assert out["messages"] == [
        {"role": "user", "content": "a\nb"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "x\nno"},
    ]


def test_stream_asks_the_backend_for_usage() -> None:
    out = chat_request(req(stream=True), [])
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}


def test_function_tools_are_nested_for_chat() -> None:
    out = chat_request(req(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"}), [])
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    full = {**WEATHER_TOOL, "description": "Weather", "strict": True}
    out = chat_request(req(tools=[full], parallel_tool_calls=False, tool_choice="required"), [])
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                              "parameters": WEATHER, "strict": True}}]
    assert out["parallel_tool_calls"] is False
    assert out["tool_choice"] == "required"


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_string_tool_choices_pass_through(choice: str) -> None:
    assert chat_request(req(tools=[WEATHER_TOOL], tool_choice=choice), [])["tool_choice"] == choice


def test_allowed_tools_filters_the_tools() -> None:
    other = {"type": "function", "name": "other", "parameters": {"type": "object"}}
    out = chat_request(req(tools=[WEATHER_TOOL, other], tool_choice={
        "type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "other"}]}), [])
    assert [t["function"]["name"] for t in out["tools"]] == ["other"]
    assert out["tool_choice"] == "required"


def test_custom_tools_become_one_string_functions() -> None:
    out = chat_request(req(tools=[PATCH_TOOL], tool_choice={"type": "custom", "name": "apply_patch"}), [])
    assert out["tools"] == [{"type": "function", "function": {
        "name": "apply_patch", "description": "Apply a patch",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}


def test_hosted_tools_are_dropped_and_named() -> None:
    body = req(tools=[{"type": "web_search"}, WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["v"]}])
    assert [t["function"]["name"] for t in chat_request(body, [])["tools"]] == ["get_weather"]
    assert dropped_tools(body) == ["web_search", "file_search"]
    only_hosted = req(tools=[{"type": "web_search_preview"}], tool_choice={"type": "web_search_preview"},
                      parallel_tool_calls=True)
    out = chat_request(only_hosted, [])
    assert "tools" not in out and "tool_choice" not in out and "parallel_tool_calls" not in out
    assert dropped_tools(req()) == []


def test_tool_fields_without_tools_are_not_forwarded() -> None:
    out = chat_request(req(tool_choice="none", parallel_tool_calls=True), [])
    assert "tool_choice" not in out and "parallel_tool_calls" not in out


def test_structured_output_formats() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    text = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    assert chat_request(req(text=text), [])["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    text["format"]["description"] = "A person"
    assert chat_request(req(text=text), [])["response_format"]["json_schema"]["description"] == "A person"
    assert chat_request(req(text={"format": {"type": "json_object"}}), [])["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in chat_request(req(text={"format": {"type": "text"}, "verbosity": "low"}), [])


def test_reasoning_effort_and_logprobs() -> None:
    out = chat_request(req(reasoning={"effort": "low", "summary": "auto"}, top_logprobs=3), [])
    assert out["reasoning_effort"] == "low"
    assert out["logprobs"] is True and out["top_logprobs"] == 3
    out = chat_request(req(include=["message.output_text.logprobs"]), [])
    assert out["logprobs"] is True and "top_logprobs" not in out
    assert "reasoning_effort" not in chat_request(req(reasoning={"summary": "auto"}), [])


FC = {"type": "function_call", "id": "fc_1", "call_id": "call_abc", "name": "get_weather",
      "arguments": '{"city":"Paris"}', "status": "completed"}
CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def test_function_call_output_round_trip() -> None:
    out = chat_request(req(input=[{"role": "user", "content": "weather?"}, FC,
                                  {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"}]), [])
    assert out["messages"] == [{"role": "user", "content": "weather?"},
                               {"role": "assistant", "content": None, "tool_calls": [CALL]},
                               {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"}]


def test_consecutive_calls_and_the_text_before_them_form_one_assistant_message() -> None:
    second = {**FC, "id": "fc_2", "call_id": "call_def", "arguments": '{"city":"Rome"}'}
    out = chat_request(req(input=[
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {"role": "assistant", "content": "Checking"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "t"}]},
        FC, second,
        {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_def", "output": "rain"},
    ]), [])
    assert out["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking", "tool_calls": [CALL, {
            "id": "call_def", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_def", "content": "rain"},
    ]


def test_tool_output_parts_text_joined_images_after_the_tool_messages() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "high"}
    out = chat_request(req(input=[FC, {**FC, "call_id": "call_2"},
                                  {"type": "function_call_output", "call_id": "call_abc",
                                   "output": [{"type": "input_text", "text": "a"}, image,
                                              {"type": "input_text", "text": "b"}]},
                                  {"type": "function_call_output", "call_id": "call_2", "output": "c"},
                                  {"role": "user", "content": "thanks"}]), [])
    assert out["messages"][1:] == [
        {"role": "tool", "tool_call_id": "call_abc", "content": "a\nb"},
        {"role": "tool", "tool_call_id": "call_2", "content": "c"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                                         "detail": "high"}}]},
        {"role": "user", "content": "thanks"},
    ]


def test_orphan_function_call_output_is_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        chat_request(req(input=[{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]), [])
    err = caught.value
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", "input")
    assert err.message == "No tool call found for function call output with call_id call_nope."


def test_custom_tool_calls_replay_as_wrapped_function_calls() -> None:
    out = chat_request(req(tools=[PATCH_TOOL], input=[
        {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "call_p", "output": "done"}]), [])
    assert out["messages"] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_p", "type": "function", "function": {
            "name": "apply_patch", "arguments": '{"input":"*** Begin Patch"}'}}]},
        {"role": "tool", "tool_call_id": "call_p", "content": "done"}]


def stored_turn(request: dict[str, Any], answer: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the gateway keeps of one turn, as the next one replays it."""
    response = response_object(completion({"content": answer}), request=request, response_id="resp_x",
                               created_at=1)
    return [*history, *history_items(input_items(request, history), response["output"])]


def test_previous_response_chain_drops_ancestor_instructions() -> None:
    r1 = req(input="My name is Ana", instructions="A")
    history = stored_turn(r1, "Hi Ana", [])
    r2 = req(input="Name?", instructions="B", previous_response_id="resp_1")
    assert chat_request(r2, history)["messages"] == [
        {"role": "system", "content": "B"}, {"role": "user", "content": "My name is Ana"},
        {"role": "assistant", "content": "Hi Ana"}, {"role": "user", "content": "Name?"}]
    history = stored_turn(r2, "Ana", history)
    r3 = req(input="Again", previous_response_id="resp_2")
    assert chat_request(r3, history)["messages"] == [
        {"role": "user", "content": "My name is Ana"}, {"role": "assistant", "content": "Hi Ana"},
        {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Ana"},
        {"role": "user", "content": "Again"}]


def test_history_call_answered_in_the_next_turn() -> None:
    r1 = req(input="weather?", tools=[WEATHER_TOOL])
    answer = completion({"content": None, "tool_calls": [{**CALL, "index": 0}]}, "tool_calls")
    output = response_object(answer, request=r1, response_id="resp_1", created_at=1)["output"]
    history = history_items(input_items(r1), output)
    r2 = req(input=[{"type": "function_call_output", "call_id": "call_abc", "output": "sunny"}],
             previous_response_id="resp_1", tools=[WEATHER_TOOL])
    assert chat_request(r2, history)["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"}]


def test_previous_response_without_new_input() -> None:
    history = stored_turn(req(input="x"), "y", [])
    assert len(chat_request({"model": "m", "previous_response_id": "resp_1"}, history)["messages"]) == 2


def test_item_references_resolve_from_history_and_earlier_input() -> None:
    history = stored_turn(req(input="x"), "y", [])
    first = history[0]["id"]
    out = chat_request(req(input=[{"type": "item_reference", "id": first}, {"id": first}]), history)
    assert out["messages"][-2:] == [{"role": "user", "content": "x"}, {"role": "user", "content": "x"}]
    with pytest.raises(GatewayError) as caught:
        chat_request(req(input=[{"type": "item_reference", "id": "msg_nope"}]), history)
    assert caught.value.param == "input[0].id"


def test_chat_messages_of_no_items() -> None:
    assert chat_messages([]) == []


# ------------------------------------------------------------------------------------------ validation

BAD = [
    ({"input": "x"}, "missing_field", "model"),
    (req(model=5), "invalid_value", "model"),
    (req(model=""), "invalid_value", "model"),
    (req(input=42), "invalid_value", "input"),
    ({"model": "m"}, "missing_field", "input"),
    (req(input=[]), "invalid_value", "input"),
    (req(input=[{"type": "reasoning", "summary": []}]), "invalid_value", "input"),
    (req(conversation="conv_1"), "invalid_value", "conversation"),
    (req(conversation={"id": "conv_1"}, previous_response_id="resp_1"), "invalid_value", "conversation"),
    (req(prompt={"id": "pmpt_1"}), "invalid_value", "prompt"),
    (req(background=True), "invalid_value", "background"),
    (req(input=["x"]), "invalid_value", "input[0]"),
    (req(input=[{"content": "x"}]), "missing_field", "input[0].type"),
    (req(input=[{"type": "message", "content": "x"}]), "missing_field", "input[0].role"),
    (req(input=[{"role": "tool", "content": "x"}]), "invalid_value", "input[0].role"),
    (req(input=[{"role": "user"}]), "missing_field", "input[0].content"),
    (req(input=[{"role": "user", "content": 5}]), "invalid_value", "input[0].content"),
    (req(input=[{"role": "user", "content": [5]}]), "invalid_value", "input[0].content[0].type"),
    (req(input=[{"role": "user", "content": [{"type": "input_text"}]}]), "missing_field", "input[0].content[0].text"),
    (req(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "invalid_value",
     "input[0].content[0].type"),
    (req(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]), "invalid_value",
     "input[0].content[0].file_id"),
    (req(input=[{"role": "user", "content": [{"type": "input_image"}]}]), "missing_field",
     "input[0].content[0].image_url"),
    (req(input=[{"role": "assistant", "content": [{"type": "input_image", "image_url": "x"}]}]), "invalid_value",
     "input[0].content[0].type"),
    (req(input=[{"role": "user", "content": "x"}, {"type": "web_search_call", "id": "ws_1"}]), "invalid_value",
     "input[1].type"),
    (req(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "missing_field", "input[0].call_id"),
    (req(input=[{"type": "function_call", "call_id": "c", "arguments": "{}"}]), "missing_field", "input[0].name"),
    (req(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]), "invalid_value",
     "input[0].arguments"),
    (req(input=[{"type": "function_call_output", "call_id": "c"}]), "missing_field", "input[0].output"),
    (req(input=[{"type": "function_call_output", "output": "x"}]), "missing_field", "input[0].call_id"),
    (req(input=[{"type": "custom_tool_call", "call_id": "c", "name": "f"}]), "missing_field", "input[0].input"),
    (req(input=[{"type": "item_reference"}]), "missing_field", "input[0].id"),
    (req(tools={"type": "function"}), "invalid_value", "tools"),
    (req(tools=[5]), "invalid_value", "tools[0]"),
    (req(tools=[{"name": "f"}]), "missing_field", "tools[0].type"),
    (req(tools=[{"type": "function"}]), "missing_field", "tools[0].name"),
    (req(tools=[{"type": "function", "function": {"name": "f"}}]), "missing_field", "tools[0].name"),
    (req(tools=[{"type": "function", "name": "f", "parameters": "x"}]), "invalid_value", "tools[0].parameters"),
    (req(tools=[{"type": "function", "name": "f", "strict": "yes"}]), "invalid_value", "tools[0].strict"),
    (req(tools=[{"type": "custom"}]), "missing_field", "tools[0].name"),
    (req(tools=[WEATHER_TOOL], tool_choice="any"), "invalid_value", "tool_choice"),
    (req(tools=[WEATHER_TOOL], tool_choice=5), "invalid_value", "tool_choice"),
    (req(tools=[WEATHER_TOOL], tool_choice={"type": "function"}), "missing_field", "tool_choice.name"),
    (req(tools=[WEATHER_TOOL], tool_choice={"type": "allowed_tools", "mode": "x", "tools": []}), "invalid_value",
     "tool_choice.mode"),
    (req(tools=[WEATHER_TOOL], tool_choice={"type": "allowed_tools", "mode": "auto"}), "invalid_value",
     "tool_choice.tools"),
    (req(text="json"), "invalid_value", "text"),
    (req(text={"format": {"type": "yaml"}}), "invalid_value", "text.format.type"),
    (req(text={"format": "json"}), "invalid_value", "text.format.type"),
    (req(text={"format": {"type": "json_schema", "schema": {}}}), "missing_field", "text.format.name"),
    (req(text={"format": {"type": "json_schema", "name": "p"}}), "missing_field", "text.format.schema"),
    (req(text={"format": {"type": "json_schema", "name": "p", "schema": []}}), "invalid_value",
     "text.format.schema"),
    (req(temperature=3), "invalid_value", "temperature"),
    (req(temperature="hot"), "invalid_value", "temperature"),
    (req(top_p=-0.1), "invalid_value", "top_p"),
    (req(max_output_tokens=0), "invalid_value", "max_output_tokens"),
    (req(max_output_tokens="16"), "invalid_value", "max_output_tokens"),
    (req(max_output_tokens=True), "invalid_value", "max_output_tokens"),
    (req(top_logprobs=21), "invalid_value", "top_logprobs"),
    (req(stream="yes"), "invalid_value", "stream"),
    (req(store=1), "invalid_value", "store"),
    (req(parallel_tool_calls="no"), "invalid_value", "parallel_tool_calls"),
    (req(instructions=["x"]), "invalid_value", "instructions"),
    (req(previous_response_id=5), "invalid_value", "previous_response_id"),
    (req(metadata=[]), "invalid_value", "metadata"),
    (req(metadata={str(i): "v" for i in range(17)}), "invalid_value", "metadata"),
    (req(metadata={"k": 1}), "invalid_value", "metadata.k"),
    (req(metadata={"k" * 65: "v"}), "invalid_value", "metadata." + "k" * 65),
    (req(truncation="sometimes"), "invalid_value", "truncation"),
    (req(include="x"), "invalid_value", "include"),
    (req(reasoning="high"), "invalid_value", "reasoning"),
    (req(reasoning={"effort": 5}), "invalid_value", "reasoning.effort"),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD)])
def test_invalid_requests_name_the_field(body: dict[str, Any], code: str, param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        chat_request(body, [])
    err = caught.value
    assert (err.code, err.param, err.status, err.type) == (code, param, 400, "invalid_request_error")
    envelope = orjson.loads(error_body(err, "req_1"))["error"]
    assert {"message", "type", "param", "code"} <= envelope.keys()
    validate(envelope, "Error")


def test_body_that_is_not_an_object() -> None:
    with pytest.raises(GatewayError) as caught:
        chat_request([], [])  # type: ignore[arg-type]
    assert caught.value.status == 400


GARBAGE: list[Any] = [None, 0, 1.5, "", "x", [], [None], {}, {"type": None}, {"type": 5}, True, [[]], {"a": 1}]


@pytest.mark.parametrize("field", ["input", "tools", "tool_choice", "text", "metadata", "reasoning", "include",
                                   "instructions", "temperature", "top_p", "max_output_tokens", "stream", "store",
                                   "truncation", "top_logprobs", "parallel_tool_calls", "user"])
def test_garbage_in_any_field_is_a_gateway_error_or_accepted(field: str) -> None:
    for value in GARBAGE:
        for body in (req(**{field: value}), req(input=[{"role": "user", "content": value}]),
                     req(input=[{"type": "function_call_output", "call_id": "c", "output": value}]),
                     req(input=[{"type": "function_call", "call_id": value, "name": value, "arguments": value}])):
            try:
                chat_request(body, [])
                input_items(body)
            except GatewayError as err:
                assert err.status == 400, (body, err.message)


# ------------------------------------------------------------------------------------------ stored items


def test_string_input_as_a_stored_item() -> None:
    items = input_items(req(input="x"))
    assert len(items) == 1
    item = items[0]
    assert item["id"].startswith("msg_")
    assert item == {"type": "message", "id": item["id"], "role": "user", "status": "completed",
                    "content": [{"type": "input_text", "text": "x"}]}
    validate(item, "ItemResource")
    ITEMS.validate_python(item)


def test_stored_items_keep_ids_and_fill_what_the_listing_requires() -> None:
    items = input_items(req(input=[
        {"role": "developer", "content": "D"},
        {"type": "message", "id": "msg_mine", "role": "user",
         "content": [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": "https://x/i.png"}]},
        {"role": "assistant", "content": "ok", "phase": "final_answer"},
        {**FC, "id": None, "arguments": {"city": "Paris"}},
        {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"},
        {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch", "input": "p"},
        {"type": "custom_tool_call_output", "call_id": "call_p",
         "output": [{"type": "input_text", "text": "ok"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}], "encrypted_content": "e"},
    ]))
    prefixes = ["msg_", "msg_", "msg_", "fc_", "fco_", "ctc_", "ctco_", "rs_"]
    assert all(item["id"].startswith(prefix) for item, prefix in zip(items, prefixes, strict=True))
    assert items[1]["id"] == "msg_mine"
    assert items[1]["content"][1] == {"type": "input_image", "image_url": "https://x/i.png", "detail": "auto"}
    assert items[0]["role"] == "developer"
    assert items[2]["content"] == [{"type": "output_text", "text": "ok", "annotations": [], "logprobs": []}]
    assert items[3]["arguments"] == '{"city":"Paris"}'
    assert items[7]["encrypted_content"] == "e"
    for item in items:
        validate(item, "ItemResource")
        ITEMS.validate_python(item)
    listing = {"object": "list", "data": items, "first_id": items[0]["id"], "last_id": items[-1]["id"],
               "has_more": False}
    validate(listing, "ResponseItemList")


def test_no_input_is_no_items() -> None:
    assert input_items({"model": "m", "previous_response_id": "resp_1"}) == []


def test_history_items_are_input_then_output() -> None:
    assert history_items([{"id": "a"}], [{"id": "b"}, {"id": "c"}]) == [{"id": "a"}, {"id": "b"}, {"id": "c"}]


# ------------------------------------------------------------------------------------------ Response objects


def test_text_answer() -> None:
    request = req(input="Say hi")
    response = response_object(completion({"content": "Hello!"}), request=request, response_id="resp_1",
                               created_at=1700000000, completed_at=1700000001)
    parsed = check_response(response)
    assert response["id"] == "resp_1" and response["object"] == "response"
    assert response["status"] == "completed" and response["completed_at"] == 1700000001
    assert response["error"] is None and response["incomplete_details"] is None
    assert response["model"] == "m"  # the request's, not the backend's
    [item] = response["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["id"].startswith("msg_")
    assert item["content"] == [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert parsed.output_text == "Hello!"
    assert response["usage"] == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0,
                                                                              "cache_write_tokens": 0},
                                 "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 13}
    assert "output_text" not in response


def test_echo_defaults() -> None:
    response = response_object(completion({"content": "x"}), request=req(), response_id="resp_1", created_at=1)
    echoed = {k: response[k] for k in ("instructions", "max_output_tokens", "parallel_tool_calls",
                                       "previous_response_id", "reasoning", "store", "temperature", "text",
                                       "tool_choice", "tools", "top_p", "truncation", "metadata", "background")}
    assert echoed == {"instructions": None, "max_output_tokens": None, "parallel_tool_calls": True,
                      "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": True,
                      "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                      "top_p": 1.0, "truncation": "disabled", "metadata": {}, "background": False}
    assert "user" not in response and "usage" in response


def test_echo_of_the_request() -> None:
    fmt = {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}
    request = req(instructions="I", tools=[WEATHER_TOOL, PATCH_TOOL, {"type": "web_search"}],
                  tool_choice="required", temperature=0.5, top_p=0.5, max_output_tokens=100,
                  previous_response_id="resp_0", store=False, metadata={"a": "b"}, parallel_tool_calls=False,
                  text={"format": fmt, "verbosity": "low"}, truncation="auto", user="u",
                  reasoning={"effort": "high", "summary": "auto"}, safety_identifier="s", prompt_cache_key="p",
                  top_logprobs=2)
    response = response_object(completion({"content": "{}"}), request=request, response_id="resp_1", created_at=1)
    check_response(response)
    assert response["tools"] == [{"type": "function", "name": "get_weather", "description": None,
                                  "parameters": WEATHER, "strict": None}, PATCH_TOOL]
    for key in ("instructions", "tool_choice", "temperature", "top_p", "max_output_tokens", "previous_response_id",
                "store", "metadata", "parallel_tool_calls", "text", "truncation", "user", "reasoning",
                "safety_identifier", "prompt_cache_key", "top_logprobs"):
        assert response[key] == request[key], key


def test_hosted_tool_choice_echoes_auto() -> None:
    request = req(tools=[{"type": "web_search"}], tool_choice={"type": "web_search"})
    assert response_skeleton(request, response_id="r", created_at=1)["tool_choice"] == "auto"


def test_function_call_answer() -> None:
    request = req(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"})
    for finish in ("tool_calls", "stop", "function_call"):
        response = response_object(completion({"content": None, "tool_calls": [{**CALL, "index": 0}]}, finish),
                                   request=request, response_id="resp_1", created_at=1)
        check_response(response)
        assert response["status"] == "completed"
        [item] = response["output"]
        assert item["id"].startswith("fc_")
        assert item == {"type": "function_call", "id": item["id"], "call_id": "call_abc", "name": "get_weather",
                        "arguments": '{"city":"Paris"}', "status": "completed"}


def test_tool_call_quirks() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "a", "arguments": {"x": 1}}},
             {"id": "", "type": "function", "function": {"name": "b", "arguments": ""}},
             {"id": "x" * 65, "type": "function", "function": {"name": "c", "arguments": None}}]
    response = response_object(completion({"content": "", "tool_calls": calls}), request=req(), response_id="r",
                               created_at=1)
    check_response(response)
    a, b, c = response["output"]
    assert a["arguments"] == '{"x":1}' and a["call_id"] == "call_1"
    assert b["arguments"] == "{}" and b["call_id"].startswith("call_")
    assert c["arguments"] == "{}" and c["call_id"].startswith("call_") and len(c["call_id"]) <= 64


def test_legacy_function_call_answer() -> None:
    response = response_object(completion({"content": None, "function_call": {"name": "f", "arguments": "{}"}},
                                          "function_call"), request=req(), response_id="r", created_at=1)
    assert [(i["type"], i["name"]) for i in response["output"]] == [("function_call", "f")]


def test_reasoning_then_text_then_calls() -> None:
    message = {"content": "Checking", "reasoning_content": "think", "reasoning": "think",
               "tool_calls": [{**CALL, "index": 0}, {**CALL, "index": 1, "id": "call_2"}]}
    response = response_object(completion(message, "tool_calls"), request=req(), response_id="r", created_at=1)
    check_response(response)
    assert [i["type"] for i in response["output"]] == ["reasoning", "message", "function_call", "function_call"]
    reasoning = response["output"][0]
    assert reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert reasoning["summary"] == [] and reasoning["encrypted_content"] is None
    ollama = response_object(completion({"content": "x", "reasoning": "hmm"}), request=req(), response_id="r",
                             created_at=1)
    assert ollama["output"][0]["content"][0]["text"] == "hmm"


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_incomplete_answers(finish: str, reason: str) -> None:
    response = response_object(completion({"content": "long"}, finish), request=req(max_output_tokens=32),
                               response_id="r", created_at=1)
    check_response(response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": reason}
    assert response["output"][-1]["status"] == "incomplete"
    assert response["completed_at"] is None


def test_refusal_part() -> None:
    response = response_object(completion({"content": None, "refusal": "I can't"}), request=req(), response_id="r",
                               created_at=1)
    check_response(response)
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't"}]


def test_empty_answer_has_no_items() -> None:
    response = response_object(completion({"content": ""}), request=req(), response_id="r", created_at=1)
    check_response(response)
    assert response["output"] == [] and response["status"] == "completed"


def test_custom_tool_call_answer() -> None:
    call = {"id": "call_p", "type": "function",
            "function": {"name": "apply_patch", "arguments": '{"input":"*** Begin Patch"}'}}
    response = response_object(completion({"content": None, "tool_calls": [call]}, "tool_calls"),
                               request=req(tools=[PATCH_TOOL]), response_id="r", created_at=1)
    check_response(response)
    [item] = response["output"]
    assert item["id"].startswith("ctc_")
    assert item == {"type": "custom_tool_call", "id": item["id"], "call_id": "call_p", "name": "apply_patch",
                    "input": "*** Begin Patch", "status": "completed"}


def test_logprobs_carry_over() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                             "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                                              {"token": "Yo", "logprob": -2.0, "bytes": None}]}]}
    response = response_object(completion({"content": "Hi"}, logprobs=logprobs), request=req(top_logprobs=2),
                               response_id="r", created_at=1)
    check_response(response)
    assert response["output"][0]["content"][0]["logprobs"] == [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                          {"token": "Yo", "logprob": -2.0, "bytes": [89, 111]}]}]


def test_usage_mapping() -> None:
    assert response_usage({"prompt_tokens": 36, "completion_tokens": 87, "total_tokens": 123,
                           "prompt_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 2},
                           "completion_tokens_details": {"reasoning_tokens": 40}}) == {
        "input_tokens": 36, "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 2},
        "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 40}, "total_tokens": 123}
    assert response_usage({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None})[
        "total_tokens"] == 7
    assert response_usage({"completion_tokens": 2})["input_tokens"] == 0
    for absent in (None, {}, {"prompt_tokens": None}, "x"):
        assert response_usage(absent) is None


def test_no_usage_leaves_it_out() -> None:
    chat = completion({"content": "x"})
    del chat["usage"]
    response = response_object(chat, request=req(), response_id="r", created_at=1)
    check_response(response)
    assert "usage" not in response


@pytest.mark.parametrize("chat", [{}, {"choices": []}, {"choices": [None]}, {"choices": "x"}])
def test_answer_without_a_choice(chat: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as caught:
        response_object(chat, request=req(), response_id="r", created_at=1)
    assert caught.value.status == 502


def test_sdk_reads_the_non_streamed_response_and_parses_structured_output() -> None:
    class Person(BaseModel):
        name: str
        age: int

    fmt = {"type": "json_schema", "name": "Person", "schema": Person.model_json_schema(), "strict": True}
    response = response_object(completion({"content": '{"name":"Ana","age":3}'}), request=req(text={"format": fmt}),
                               response_id="resp_1", created_at=1)
    client, _ = sdk_client(orjson.dumps(response), "application/json")
    parsed = client.responses.parse(model="m", input="hi", text_format=Person)
    assert parsed.output_parsed == Person(name="Ana", age=3)
    assert parsed.text.format.type == "json_schema"
    assert client.responses.create(model="m", input="hi").output_text == '{"name":"Ana","age":3}'


# ------------------------------------------------------------------------------------------ streams


def test_streamed_text_sequence() -> None:
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "He"}), chunk({"content": None}),
              chunk({"content": "llo"}), chunk({"content": "!"}), chunk(finish="stop"), usage_chunk()]
    events, stream = run(chunks)
    assert types(events) == ["created", "in_progress", "output_item.added", "content_part.added",
                             "output_text.delta", "output_text.delta", "output_text.delta", "output_text.done",
                             "content_part.done", "output_item.done", "completed"]
    created, in_progress, added, part_added, *deltas, text_done, part_done, item_done, completed = events
    for event in (created, in_progress):
        assert event["response"]["status"] == "in_progress"
        assert event["response"]["output"] == [] and "usage" not in event["response"]
        assert event["response"]["id"] == "resp_test"
    item_id = added["item"]["id"]
    assert added["item"] == {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
                             "content": []}
    assert part_added["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    for event in (part_added, *deltas, text_done, part_done):
        assert (event["item_id"], event["output_index"], event["content_index"]) == (item_id, 0, 0)
    assert "".join(d["delta"] for d in deltas) == text_done["text"] == "Hello!"
    assert part_done["part"] == {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}
    assert item_done["item"]["status"] == "completed"
    assert item_done["item"]["content"] == [part_done["part"]]
    final = completed["response"]
    assert final["status"] == "completed" and final["completed_at"]
    assert final["output"] == [item_done["item"]]
    assert final["usage"]["input_tokens"] == 10 and final["usage"]["total_tokens"] == 13
    assert stream.response is final
    assert sdk_stream(events).output_text == "Hello!"


def function_call_chunks(*fragments: Any, finish: str = "tool_calls") -> list[dict[str, Any]]:
    first, *rest = fragments
    return [chunk({"role": "assistant", "content": None, **tool_delta(0, id="call_abc", name="get_weather",
                                                                      args=first)}),
            *(chunk(tool_delta(0, args=fragment)) for fragment in rest), chunk(finish=finish), usage_chunk()]


def test_streamed_function_call_sequence() -> None:
    request = req(stream=True, tools=[WEATHER_TOOL])
    events, _ = run(function_call_chunks('{"city":', '"Par', 'is"}'), request)
    assert types(events) == ["created", "in_progress", "output_item.added", "function_call_arguments.delta",
                             "function_call_arguments.delta", "function_call_arguments.delta",
                             "function_call_arguments.done", "output_item.done", "completed"]
    added, done, item_done = events[2], events[6], events[7]
    item_id = added["item"]["id"]
    assert item_id.startswith("fc_")
    assert added["item"] == {"type": "function_call", "id": item_id, "call_id": "call_abc", "name": "get_weather",
                             "arguments": "", "status": "in_progress"}
    deltas = [e["delta"] for e in events[3:6]]
    assert done["name"] == "get_weather"
    assert done["arguments"] == "".join(deltas) == '{"city":"Paris"}'
    assert item_done["item"] == {**added["item"], "arguments": '{"city":"Paris"}', "status": "completed"}
    assert events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["output"] == [item_done["item"]]
    final = sdk_stream(events, tools=[WEATHER_TOOL])
    assert final.output[0].arguments == '{"city":"Paris"}'


@pytest.mark.parametrize("chunks", [
    function_call_chunks('{"city":"Paris"}'),
    function_call_chunks('{"city":"Paris"}', finish="stop"),
    function_call_chunks({"city": "Paris"}),
    # name only once arguments started: the item waits for it
    [chunk({"tool_calls": [{"index": 0, "id": "call_abc", "function": {"arguments": '{"city":"Paris"}'}}]}),
     chunk(tool_delta(0, name="get_weather")), chunk(finish="tool_calls"), usage_chunk()],
])
def test_function_call_quirks_give_the_same_events(chunks: list[dict[str, Any]]) -> None:
    events, _ = run(chunks, req(stream=True, tools=[WEATHER_TOOL]))
    assert types(events) == ["created", "in_progress", "output_item.added", "function_call_arguments.delta",
                             "function_call_arguments.done", "output_item.done", "completed"]
    assert events[2]["item"]["name"] == "get_weather"
    assert events[3]["delta"] == events[4]["arguments"] == '{"city":"Paris"}'
    assert events[-1]["response"]["status"] == "completed"


def test_call_without_arguments_streams_empty_object() -> None:
    events, _ = run([chunk(tool_delta(0, id="call_1", name="now", args="")), chunk(finish="tool_calls")])
    assert types(events)[2:5] == ["output_item.added", "function_call_arguments.delta",
                                  "function_call_arguments.done"]
    assert events[3]["delta"] == events[4]["arguments"] == "{}"
    assert events[-1]["response"]["output"][0]["arguments"] == "{}"


def text_then_two_calls(all_at_index_zero: bool) -> list[dict[str, Any]]:
    second = 0 if all_at_index_zero else 1
    return [chunk({"role": "assistant", "content": "Check"}), chunk({"content": "ing"}),
            chunk(tool_delta(0, id="call_1", name="get_weather", args="")),
            chunk(tool_delta(0, args='{"city":"Paris"}')),
            chunk(tool_delta(second, id="call_2", name="get_weather", args='{"city":')),
            chunk(tool_delta(second, args='"Rome"}')),
            chunk(finish="tool_calls"), usage_chunk()]


@pytest.mark.parametrize("all_at_index_zero", [False, True])
def test_text_then_two_parallel_calls(all_at_index_zero: bool) -> None:
    events, _ = run(text_then_two_calls(all_at_index_zero), req(stream=True, tools=[WEATHER_TOOL]))
    assert types(events) == [
        "created", "in_progress",
        "output_item.added", "content_part.added", "output_text.delta", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.delta",
        "function_call_arguments.done", "output_item.done",
        "completed"]
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]
    assert [i["call_id"] for i in final["output"][1:]] == ["call_1", "call_2"]
    assert [i["arguments"] for i in final["output"][1:]] == ['{"city":"Paris"}', '{"city":"Rome"}']
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
    final_sdk = sdk_stream(events, tools=[WEATHER_TOOL])
    assert final_sdk.output_text == "Checking"
    assert [o.type for o in final_sdk.output] == ["message", "function_call", "function_call"]


def test_text_after_a_call_opens_a_new_message() -> None:
    events, _ = run([chunk(tool_delta(0, id="call_1", name="f", args="{}")), chunk({"content": "done"}),
                     chunk(finish="stop")])
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["function_call", "message"]


def test_interleaved_call_fragments_still_give_whole_arguments() -> None:
    events, _ = run([chunk(tool_delta(0, id="call_1", name="f", args='{"a":')),
                     chunk(tool_delta(1, id="call_2", name="g", args='{"b":2}')),
                     chunk(tool_delta(0, args="1}")), chunk(finish="tool_calls")])
    assert [i["arguments"] for i in events[-1]["response"]["output"]] == ['{"a":1}', '{"b":2}']


@pytest.mark.parametrize(("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")])
def test_streamed_incomplete(finish: str, reason: str) -> None:
    events, stream = run([chunk({"content": "long"}), chunk(finish=finish), usage_chunk()],
                         req(stream=True, max_output_tokens=32))
    assert types(events)[-1] == "incomplete" and "completed" not in types(events)
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": reason}
    assert final["output"][0]["status"] == "incomplete"
    assert final["usage"]["output_tokens"] == 3
    assert stream.response is final


def test_usage_on_the_finish_chunk() -> None:
    events, _ = run([chunk({"content": "x"}), {**chunk(finish="stop"), "usage": {"prompt_tokens": 4,
                                                                                 "completion_tokens": 1}}])
    assert events[-1]["response"]["usage"]["total_tokens"] == 5


def test_usage_absent_and_given_by_the_caller() -> None:
    events, _ = run([chunk({"content": "x"}), chunk(finish="stop")])
    assert "usage" not in events[-1]["response"]
    estimate = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8, "estimated": True}
    events, _ = run([chunk({"content": "x"}), chunk(finish="stop"), usage_chunk()], usage=estimate)
    assert events[-1]["response"]["usage"]["input_tokens"] == 7


def test_streamed_reasoning_then_text() -> None:
    events, _ = run([chunk({"reasoning_content": "Let me", "reasoning": "Let me"}), chunk({"reasoning": " think"}),
                     chunk({"content": "42"}), chunk(finish="stop")])
    assert types(events)[2:9] == ["output_item.added", "reasoning_text.delta", "reasoning_text.delta",
                                  "reasoning_text.done", "output_item.done", "output_item.added",
                                  "content_part.added"]
    assert events[5]["text"] == "Let me think"
    reasoning = events[-1]["response"]["output"][0]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think"}]
    assert sdk_stream(events).output_text == "42"


def test_streamed_refusal() -> None:
    events, _ = run([chunk({"content": "Well"}), chunk({"refusal": "No"}), chunk({"refusal": "pe"}),
                     chunk(finish="stop")])
    assert types(events)[2:13] == ["output_item.added", "content_part.added", "output_text.delta",
                                   "output_text.done", "content_part.done", "content_part.added", "refusal.delta",
                                   "refusal.delta", "refusal.done", "content_part.done", "output_item.done"]
    assert [e["content_index"] for e in events[3:12]] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert events[-1]["response"]["output"][0]["content"] == [
        {"type": "output_text", "text": "Well", "annotations": [], "logprobs": []},
        {"type": "refusal", "refusal": "Nope"}]


def test_streamed_custom_tool_call() -> None:
    request = req(stream=True, tools=[PATCH_TOOL])
    events, _ = run([chunk(tool_delta(0, id="call_p", name="apply_patch", args='{"input":"*** Be')),
                     chunk(tool_delta(0, args='gin"}')), chunk(finish="tool_calls")], request)
    assert types(events) == ["created", "in_progress", "output_item.added", "custom_tool_call_input.delta",
                             "custom_tool_call_input.done", "output_item.done", "completed"]
    assert events[2]["item"]["type"] == "custom_tool_call" and events[2]["item"]["input"] == ""
    assert events[3]["delta"] == events[4]["input"] == "*** Begin"
    assert events[5]["item"]["input"] == "*** Begin"


def test_streamed_logprobs() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]}
    events, _ = run([{**chunk({"content": "Hi"}), "choices": [{"index": 0, "delta": {"content": "Hi"},
                                                               "logprobs": logprobs, "finish_reason": None}]},
                     chunk(finish="stop")], req(stream=True, top_logprobs=0))
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"] == [{"token": "Hi", "logprob": -0.5, "top_logprobs": []}]
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]


def test_stream_and_non_stream_agree() -> None:
    chunks = text_then_two_calls(False)
    events, _ = run(chunks, req(stream=True, tools=[WEATHER_TOOL]))
    message = {"content": "Checking", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]}
    whole = response_object(completion(message, "tool_calls"), request=req(stream=True, tools=[WEATHER_TOOL]),
                            response_id="resp_test", created_at=1700000000)
    streamed = copy.deepcopy(events[-1]["response"])
    for response in (streamed, whole):
        response.pop("completed_at")
    assert without_ids(streamed) == without_ids(whole)


def test_error_chunk_raises_and_fail_closes_the_open_item() -> None:
    stream = ResponsesStream(req(stream=True), response_id="resp_test", created_at=1)
    events = stream.start() + stream.feed(chunk({"content": "He"})) + stream.feed(chunk({"content": "l"}))
    with pytest.raises(GatewayError) as caught:
        stream.feed({"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}})
    events += stream.fail(caught.value)
    check_events(events)
    assert types(events)[-4:] == ["output_text.done", "content_part.done", "output_item.done", "failed"]
    final = events[-1]["response"]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "CUDA out of memory"}
    assert final["output"][0]["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "Hel"
    assert stream.response is final
    assert stream.feed(chunk({"content": "x"})) == [] and stream.finish() == [] and stream.fail(caught.value) == []
    assert all("error" not in e for e in events[:-1])  # the SDK raises on any top-level error key
    client, _ = sdk_client(b"".join(sse(e) for e in events), "text/event-stream")
    seen = [e.type for e in client.responses.create(model="m", input="hi", stream=True)]
    assert seen[-1] == "response.failed"


def test_closed_items_keep_their_status_when_the_stream_fails() -> None:
    stream = ResponsesStream(req(stream=True), response_id="resp_test", created_at=1)
    events = stream.feed(chunk(tool_delta(0, id="call_1", name="f", args="{}")))
    events += stream.feed(chunk({"content": "x"}))
    events += stream.fail(GatewayError("backend_timeout", "timed out"))
    check_events(events)
    assert [i["status"] for i in events[-1]["response"]["output"]] == ["completed", "incomplete"]


@pytest.mark.parametrize(("code", "expected"), [("rate_limit_exceeded", "rate_limit_exceeded"),
                                                ("budget_exceeded", "rate_limit_exceeded"),
                                                ("backend_unreachable", "server_error"),
                                                ("context_length_exceeded", "context_length_exceeded")])
def test_failure_codes(code: str, expected: str) -> None:
    stream = ResponsesStream(req(stream=True), response_id="resp_test", created_at=1)
    events = stream.fail(GatewayError(code, "m"))
    assert types(events) == ["created", "in_progress", "failed"]
    assert events[-1]["response"]["error"]["code"] == expected


def test_eof_before_the_finish_reason_fails() -> None:
    stream = ResponsesStream(req(stream=True), response_id="resp_test", created_at=1)
    events = stream.feed(chunk({"content": "x"})) + stream.finish()
    check_events(events)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"


def test_stream_echoes_its_websocket_lane() -> None:
    stream = ResponsesStream(req(stream_id="agent_1"), response_id="resp_test", created_at=1)
    events = stream.start() + stream.feed(chunk({"content": "x"}, finish="stop")) + stream.finish()
    assert {e["stream_id"] for e in events} == {"agent_1"}


def test_warmup_turn() -> None:
    stream = ResponsesStream(req(input=[{"role": "user", "content": "context"}], instructions="I",
                                 tools=[WEATHER_TOOL]), response_id="resp_warm", created_at=1)
    events = stream.warmup()
    check_events(events)
    assert types(events) == ["created", "completed"]
    assert events[-1]["response"]["output"] == [] and stream.response is events[-1]["response"]
    assert stream.start() == [] and stream.warmup() == []


def test_sse_framing() -> None:
    events, _ = run([chunk({"content": "x"}), chunk(finish="stop")])
    for event in events:
        frame = sse(event)
        head, data, blank = frame.split(b"\n", 2)
        assert head == b"event: " + event["type"].encode()
        assert data.startswith(b"data: ") and blank == b"\n"
        assert json.loads(data[6:]) == event


# ------------------------------------------------------------------------------------------ errors


def test_error_body_is_the_openai_envelope() -> None:
    body = orjson.loads(error_body(GatewayError("missing_field", "Missing 'model'.", param="model"), "req_1"))
    assert body == {"error": {"message": "Missing 'model'.", "type": "invalid_request_error", "param": "model",
                              "code": "missing_field", "request_id": "req_1"}}
    validate(body, "ErrorResponse")


def test_previous_response_not_found() -> None:
    err = previous_not_found("resp_missing")
    assert (err.status, err.type, err.code, err.param) == (400, "invalid_request_error",
                                                           "previous_response_not_found", "previous_response_id")
    assert err.message == "Previous response with id 'resp_missing' not found."
    frame = ws_error_frame(err)
    assert frame == {"type": "error", "status": 400, "error": {
        "type": "invalid_request_error", "code": "previous_response_not_found", "param": "previous_response_id",
        "message": "Previous response with id 'resp_missing' not found."}}
    validate(frame, "ResponseWsError")


def test_ws_error_frame_with_lane_and_headers() -> None:
    err = GatewayError("rate_limit_exceeded", "slow down", headers={"Retry-After": "3"})
    frame = ws_error_frame(err, stream_id="agent_1")
    validate(frame, "ResponseWsError")
    assert frame["status"] == 429 and frame["stream_id"] == "agent_1"
    assert frame["error"]["headers"] == {"Retry-After": "3"}


# ------------------------------------------------------------------------------------------ websocket frames


def test_ws_request_flat_and_nested() -> None:
    body, generate = ws_request(b'{"type":"response.create","model":"m","input":"hi","stream":false}')
    assert body == {"model": "m", "input": "hi", "stream": True} and generate is True
    body, generate = ws_request(orjson.dumps({"type": "response.create", "model": "flat", "generate": False,
                                              "stream_id": "agent_1.x",
                                              "response": {"model": "nested", "instructions": "I"}}))
    assert body == {"model": "flat", "instructions": "I", "stream_id": "agent_1.x", "stream": True}
    assert generate is False


@pytest.mark.parametrize(("frame", "param"), [
    (b"not json", None), (b"[1]", None), (b"{}", None),
    (b'{"model":"m"}', "type"), (b'{"type":5}', "type"), (b'{"type":"session.update"}', "type"),
    (b'{"type":"response.create","generate":"no"}', "generate"),
    (b'{"type":"response.create","stream_id":"bad lane"}', "stream_id"),
    (b'{"type":"response.create","stream_id":""}', "stream_id"),
])
def test_bad_ws_frames_are_error_frames(frame: bytes, param: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        ws_request(frame)
    assert caught.value.status == 400 and caught.value.param == param
    validate(ws_error_frame(caught.value), "ResponseWsError")


def test_a_call_id_arriving_late_or_too_long_stays_stable() -> None:
    long_id = "x" * 80
    events, _ = run([chunk(tool_delta(0, id=long_id, name="f", args='{"a":')), chunk(tool_delta(0, id=long_id,
                                                                                              args="1}")),
                     chunk(finish="tool_calls")])
    [item] = events[-1]["response"]["output"]
    assert item["arguments"] == '{"a":1}' and item["call_id"].startswith("call_")
    assert events[2]["item"]["call_id"] == item["call_id"]
    events, _ = run([chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{"}}]}),
                     chunk(tool_delta(0, id="call_late", args="}")), chunk(finish="tool_calls")])
    [item] = events[-1]["response"]["output"]
    assert item["arguments"] == "{}" and events[2]["item"]["call_id"] == item["call_id"]
    sdk_stream(events)


def test_odd_chunks_are_ignored() -> None:
    odd: list[Any] = [[], "x", {}, {"choices": None}, {"choices": [None]}, {"choices": [{"delta": None}]}]
    events, _ = run([*odd,
                     chunk({"content": "x", "tool_calls": "no"}), chunk({"tool_calls": [5]}), chunk(finish="stop")])
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["message"]
