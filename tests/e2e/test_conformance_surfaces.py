"""The 25 conformance cases of spec-responses-messages.md §6, one test per case (variants parametrised).

The official openai and anthropic SDKs against a private appliance (2 workers) whose chat backend is the
OpenAI fake playing scripted fixtures (tests/fakes/chat_scripts.py): an ``x-mock-script`` header selects
one over HTTP, a ``mock/script-<name>`` model over the WebSocket. "Backend got X" asserts the chat request
the fake recorded. Raw SSE is read with httpx, since the SDKs hide the ``event:`` lines. Responses objects
and every streamed event are validated against OpenAI's OpenAPI spec. Cases 1, 3, 18, 19 and 25 also run
against the real llama.cpp server (marker ``llamacpp``), with content assertions relaxed.

Not marked ``frozen``: it drives the same translation code as test_messages.py and test_responses.py, which
the frozen suite reruns against the binary; this suite's 46 tests would only add CI time there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
import websockets.exceptions
import websockets.sync.client

from tests.fakes.chat_scripts import HEADER, WEATHER_ARGS
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.openapi import validate, validate_event, validate_ws_frame
from tests.support.threaded import free_port

M = "m"  # the model name clients send: the mock backend's
TINY = "tiny-chat"  # the real llama.cpp server's
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_FN = {"type": "function", "name": "get_weather", "parameters": WEATHER_SCHEMA}
WEATHER_TOOL = {"name": "get_weather", "input_schema": WEATHER_SCHEMA}
CHAT_WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", *["response.output_text.delta"] * 3, "response.output_text.done",
               "response.content_part.done", "response.output_item.done", "response.completed"]
CALL_EVENTS_3 = ["response.created", "response.in_progress", "response.output_item.added",
                 *["response.function_call_arguments.delta"] * 3, "response.function_call_arguments.done",
                 "response.output_item.done", "response.completed"]
CALL_EVENTS_1 = [*CALL_EVENTS_3[:3], *CALL_EVENTS_3[5:]]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI, llamacpp_port: int) -> Iterator[Appliance]:
    """No retries and breakers that never open: the scripted failures must not change later cases."""
    app = Appliance(tmp_path_factory.mktemp("conformance"), workers=2, config={
        "discovery": {"enabled": False, "interval_s": 2},
        "routing": {"retries": 0, "breaker_failures": 10000, "breaker_min_requests": 10000},
        "backends": [
            {"name": "mock", "url": fake_openai.url + "/v1", "discover": False, "models": [M]},
            {"name": "down", "url": f"http://127.0.0.1:{free_port()}/v1", "discover": False,
             "models": ["down-model"]},
            {"name": "llamacpp", "url": f"http://127.0.0.1:{llamacpp_port}/v1", "timeout_s": 120},
        ],
        "models": [{"name": TINY, "target": "llamacpp/tiny"},
                   {"name": "all-down", "targets": ["down/down-model"]}],
    })
    app.start()
    yield app
    app.stop()


def oai(app: Appliance, script: str | None = None, key: str = ADMIN_KEY) -> openai.OpenAI:
    """An openai client with its own connection pool (successive clients tend to reach other workers)."""
    return openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0, timeout=30,
                         default_headers={HEADER: script} if script else None, http_client=httpx.Client(timeout=30))


def ant(app: Appliance, script: str | None = None, key: str = ADMIN_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=app.url, api_key=key, max_retries=0, timeout=30,
                               default_headers={HEADER: script} if script else None)


def raw_sse(app: Appliance, path: str, body: dict[str, Any], script: str | None = None) -> list[tuple[str, dict]]:
    """(event name, data) of every frame of a streamed answer, checking each frame names its event."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "anthropic-version": "2023-06-01", **(
        {HEADER: script} if script else {})}
    with httpx.stream("POST", app.url + path, json={**body, "stream": True}, headers=headers,
                      timeout=30) as response:
        assert response.status_code == 200, response.read()
        text = response.read().decode()
    frames = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: "), block
        name = lines[0][7:]
        data = json.loads("".join(line[6:] for line in lines[1:] if line.startswith("data: ")))
        assert data["type"] == name, block
        frames.append((name, data))
    return frames


def responses_events(app: Appliance, body: dict[str, Any], script: str | None = None) -> list[dict[str, Any]]:
    """A streamed Responses answer's events, each validated against its schema in the spec."""
    events = [data for _name, data in raw_sse(app, "/v1/responses", body, script)]
    for event in events:
        validate_event(event)
    return events


def assert_stream_rules(events: list[dict[str, Any]]) -> None:
    """The item and index rules every Responses stream obeys (spec §1.5)."""
    assert events[0]["type"] == "response.created"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert sum(e["type"] in TERMINAL for e in events) == 1 and events[-1]["type"] in TERMINAL
    ids = {events[0]["response"]["id"], events[-1]["response"]["id"]}
    assert len(ids) == 1
    open_item: dict[str, Any] | None = None
    next_index = 0
    for event in events[1:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_item is None and event["output_index"] == next_index  # not interleaved, dense
            open_item = event["item"]
        elif kind == "response.output_item.done":
            assert open_item is not None and event["item"]["id"] == open_item["id"]
            assert event["output_index"] == next_index
            open_item, next_index = None, next_index + 1
        elif "item_id" in event:
            assert open_item is not None and event["item_id"] == open_item["id"]
            assert event["output_index"] == next_index
    assert open_item is None
    assert len(events[-1]["response"]["output"]) == next_index


def raw_response(client: openai.OpenAI, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """responses.create, parsed by the SDK and as JSON (validated against the spec's Response)."""
    raw = client.responses.with_raw_response.create(**kwargs)
    data = raw.http_response.json()
    validate(data, "Response")
    return raw.parse(), data


# ------------------------------------------------------------------------------------------ 1-13: Responses (HTTP)


def test_01_responses_non_stream_text(app: Appliance, fake_openai: FakeOpenAI) -> None:
    r, _ = raw_response(oai(app, "hello"), model=M, input="Say hi")
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.error is None and r.incomplete_details is None and len(r.output) == 1
    item = r.output[0]
    assert (item.type, item.role, item.status) == ("message", "assistant", "completed") and item.id.startswith("msg_")
    part = item.content[0]
    assert (part.type, part.text, part.annotations) == ("output_text", "Hello!", [])
    assert r.output_text == "Hello!" and r.model == M
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (10, 3, 13)
    assert r.usage.input_tokens_details.cached_tokens == 0 and r.usage.output_tokens_details.reasoning_tokens == 0
    assert fake_openai.last_chat()["messages"] == [{"role": "user", "content": "Say hi"}]
    assert httpx.get(fake_openai.url + "/_mock/last_request").json() == fake_openai.last_chat()


@pytest.mark.llamacpp
def test_01_responses_non_stream_text_real_server(app: Appliance, llamacpp_url: str) -> None:
    r, _ = raw_response(oai(app), model=TINY, input="Say hi", max_output_tokens=16)
    assert r.id.startswith("resp_") and r.status in ("completed", "incomplete") and r.error is None
    assert r.output[0].type == "message" and r.output[0].id.startswith("msg_") and r.model == TINY
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_02_responses_input_mapping(app: Appliance, fake_openai: FakeOpenAI) -> None:
    image = "data:image/png;base64,AAAA"
    oai(app, "hello").responses.create(
        model=M, instructions="I", temperature=0.2, top_p=0.9, max_output_tokens=64, metadata={"k": "v"}, store=True,
        input=[{"role": "developer", "content": "D"},
               {"type": "message", "role": "user", "content": [
                   {"type": "input_text", "text": "look"},
                   {"type": "input_image", "image_url": image, "detail": "low"}]},
               {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}])
    sent = fake_openai.last_chat()
    assert sent["messages"] == [
        {"role": "system", "content": "I"}, {"role": "system", "content": "D"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": image, "detail": "low"}}]},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (64, 0.2, 0.9)
    assert "metadata" not in sent and "store" not in sent


def _check_text_stream(events: list[dict[str, Any]], text: str | None) -> None:
    assert_stream_rules(events)
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == TEXT_EVENTS[:4] and kinds[-4:] == TEXT_EVENTS[-4:] and deltas
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    item_id = events[2]["item"]["id"]
    for event in events[2:-1]:
        assert event["output_index"] == 0 and event.get("item_id", item_id) == item_id
        assert event.get("content_index", 0) == 0
    done = next(e for e in events if e["type"] == "response.output_text.done")
    final = events[-1]["response"]
    joined = "".join(d["delta"] for d in deltas)
    assert joined == done["text"] == final["output"][0]["content"][0]["text"]
    assert final["usage"] is not None and final["usage"]["output_tokens"] > 0
    if text is not None:
        assert kinds == TEXT_EVENTS and joined == text


def test_03_responses_stream_text(app: Appliance) -> None:
    events = responses_events(app, {"model": M, "input": "Say hi"}, "hello")
    _check_text_stream(events, "Hello!")
    sdk_events = list(oai(app, "hello").responses.create(model=M, input="Say hi", stream=True))
    assert [e.type for e in sdk_events] == TEXT_EVENTS
    with oai(app, "hello").responses.stream(model=M, input="Say hi") as stream:
        assert stream.get_final_response().output_text == "Hello!"


@pytest.mark.llamacpp
def test_03_responses_stream_text_real_server(app: Appliance, llamacpp_url: str) -> None:
    events = responses_events(app, {"model": TINY, "input": "Say hi", "max_output_tokens": 16})
    if events[-1]["type"] == "response.incomplete":  # the tiny model ran out of tokens: same rules
        assert_stream_rules(events)
    else:
        _check_text_stream(events, None)
    with oai(app).responses.stream(model=TINY, input="Say hi", max_output_tokens=16) as stream:
        sdk_events = list(stream)  # the SDK's accumulator takes every event
    # The random-weights model rarely stops by itself, and get_final_response() insists on response.completed.
    assert sdk_events[0].type == "response.created"
    assert sdk_events[-1].type in ("response.completed", "response.incomplete")
    assert sdk_events[-1].response.output[0].type == "message"


@pytest.mark.parametrize("script", ["weather", "weather-one-chunk", "weather-finish-stop", "weather-dict"])
def test_04_responses_non_stream_function_call(app: Appliance, fake_openai: FakeOpenAI, script: str) -> None:
    r, _ = raw_response(oai(app, script), model=M, input="Weather in Paris?", tools=[WEATHER_FN],
                        tool_choice={"type": "function", "name": "get_weather"})
    assert r.status == "completed" and [item.type for item in r.output] == ["function_call"]
    call = r.output[0]
    assert call.id.startswith("fc_") and (call.call_id, call.name) == ("call_abc", "get_weather")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
    if script == "weather":
        assert call.arguments == '{"city":"Paris"}'
    sent = fake_openai.last_chat()
    assert sent["tools"] == CHAT_WEATHER
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("script", ["weather", "weather-one-chunk", "weather-finish-stop", "weather-dict"])
def test_05_responses_stream_function_call(app: Appliance, script: str) -> None:
    events = responses_events(app, {"model": M, "input": "Weather?", "tools": [WEATHER_FN]}, script)
    assert_stream_rules(events)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    fragments = script in ("weather", "weather-finish-stop")  # else the whole call came in one chunk
    assert kinds == (CALL_EVENTS_3 if fragments else CALL_EVENTS_1)
    added = events[2]["item"]
    assert (added["type"], added["arguments"], added["status"]) == ("function_call", "", "in_progress")
    assert (added["call_id"], added["name"]) == ("call_abc", "get_weather")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["name"] == "get_weather" and done["arguments"] == "".join(deltas)
    assert json.loads(done["arguments"]) == {"city": "Paris"}
    if script != "weather-dict":
        assert done["arguments"] == '{"city":"Paris"}'
    assert events[-2]["item"]["status"] == "completed" and events[-1]["response"]["status"] == "completed"


def test_06_responses_stream_text_then_two_calls(app: Appliance) -> None:
    events = responses_events(app, {"model": M, "input": "Weather?", "tools": [WEATHER_FN]}, "checking-two-calls")
    assert_stream_rules(events)
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "message"), (1, "function_call"), (2, "function_call")]
    kinds = [e["type"] for e in events]
    message_done = next(i for i, e in enumerate(events) if e["type"] == "response.output_item.done")
    assert message_done < kinds.index("response.output_item.added", 3)  # the message closes first
    for index, call_id in ((1, "call_abc"), (2, "call_def")):
        group = [e["type"] for e in events if e.get("output_index") == index]
        assert group[0] == "response.output_item.added" and group[-1] == "response.output_item.done"
        assert group[-2] == "response.function_call_arguments.done"
        assert next(e for e in added if e["output_index"] == index)["item"]["call_id"] == call_id
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message", "function_call", "function_call"]
    with oai(app, "checking-two-calls").responses.stream(model=M, input="Weather?", tools=[WEATHER_FN]) as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]


FC_ITEM = {"type": "function_call", "id": "fc_0123", "call_id": "call_abc", "name": "get_weather",
           "arguments": '{"city":"Paris"}', "status": "completed"}
FC_CHAT = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}


def test_07_function_call_output_round_trip(app: Appliance, fake_openai: FakeOpenAI) -> None:
    client = oai(app, "hello")
    client.responses.create(model=M, input=[
        {"role": "user", "content": "weather?"}, {"type": "reasoning", "id": "rs_1", "summary": []}, FC_ITEM,
        {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"}])
    assert fake_openai.last_chat()["messages"] == [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [FC_CHAT]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"}]
    second = {**FC_ITEM, "id": "fc_4567", "call_id": "call_def", "arguments": '{"city":"Rome"}'}
    client.responses.create(model=M, input=[
        {"role": "user", "content": "weather?"}, FC_ITEM, second,
        {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_def", "output": "rain"}])
    sent = fake_openai.last_chat()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]  # both calls in ONE message
    assert [c["id"] for c in sent[1]["tool_calls"]] == ["call_abc", "call_def"]
    with pytest.raises(openai.BadRequestError) as orphan:
        client.responses.create(model=M, input=[
            {"role": "user", "content": "weather?"},
            {"type": "function_call_output", "call_id": "call_nope", "output": "sunny"}])
    assert orphan.value.status_code == 400 and orphan.value.param == "input"


def test_08_previous_response_id_chain(app: Appliance, fake_openai: FakeOpenAI) -> None:
    r1 = oai(app, "hello").responses.create(model=M, input="My name is Ana", instructions="A")
    r2 = oai(app, "hello").responses.create(model=M, previous_response_id=r1.id, input="Name?", instructions="B")
    assert fake_openai.last_chat()["messages"] == [
        {"role": "system", "content": "B"}, {"role": "user", "content": "My name is Ana"},
        {"role": "assistant", "content": r1.output_text}, {"role": "user", "content": "Name?"}]
    assert r2.previous_response_id == r1.id
    r3 = oai(app, "hello").responses.create(model=M, previous_response_id=r2.id, input="Bye")
    assert fake_openai.last_chat()["messages"] == [
        {"role": "user", "content": "My name is Ana"}, {"role": "assistant", "content": r1.output_text},
        {"role": "user", "content": "Name?"}, {"role": "assistant", "content": r2.output_text},
        {"role": "user", "content": "Bye"}]
    assert r3.previous_response_id == r2.id
    # Sent at once, each on a fresh connection: some land on the other worker; every one finds the chain.
    previous = r3.id
    for _ in range(4):
        previous = oai(app, "hello").responses.create(model=M, previous_response_id=previous, input="more").id


def test_09_storage_lifecycle_and_not_found(app: Appliance) -> None:
    client = oai(app, "hello")
    r = client.responses.create(model=M, input="x")
    got = oai(app).responses.retrieve(r.id)
    for name in ("id", "status", "output", "usage", "model"):
        assert getattr(got, name) == getattr(r, name), name
    validate(oai(app).responses.with_raw_response.retrieve(r.id).http_response.json(), "Response")
    items = oai(app).responses.input_items.list(r.id)
    assert items.object == "list" and items.has_more is False
    assert (items.data[0].type, items.data[0].role, items.data[0].content[0].type) == ("message", "user", "input_text")
    assert (items.first_id, items.last_id) == (items.data[0].id, items.data[-1].id)
    oai(app).responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oai(app).responses.retrieve(r.id)
    s = client.responses.create(model=M, input="y", store=False)
    with pytest.raises(openai.NotFoundError):
        oai(app).responses.retrieve(s.id)
    for missing in ("resp_nope", s.id, r.id):  # unknown, not stored, deleted
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=M, input="z", previous_response_id=missing)
        assert info.value.body["code"] == "previous_response_not_found"
        assert info.value.body["param"] == "previous_response_id"


def test_10_max_output_tokens_incomplete(app: Appliance, fake_openai: FakeOpenAI) -> None:
    r, _ = raw_response(oai(app, "long"), model=M, input="long", max_output_tokens=32)
    assert fake_openai.last_chat()["max_tokens"] == 32
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"
    events = responses_events(app, {"model": M, "input": "long", "max_output_tokens": 32}, "long")
    assert_stream_rules(events)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "response.incomplete" and "response.completed" not in kinds
    assert events[-1]["response"]["status"] == "incomplete" and events[-1]["response"]["usage"]["output_tokens"] == 32


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_11_structured_output(app: Appliance, fake_openai: FakeOpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r, _ = raw_response(oai(app, "person"), model=M, input="Who?", text={"format": {
        "type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert fake_openai.last_chat()["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    assert r.text.format.type == "json_schema"
    parsed = oai(app, "person").responses.parse(model=M, input="Who?", text_format=Person)
    assert parsed.output_parsed == Person(name="Ana", age=3)
    oai(app, "person").responses.create(model=M, input="Who?", text={"format": {"type": "json_object"}})
    assert fake_openai.last_chat()["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("script", ["reset", "error-event"])
def test_12_mid_stream_failure(app: Appliance, script: str) -> None:
    events = responses_events(app, {"model": M, "input": "hi"}, script)
    assert_stream_rules(events)
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert kinds.count("response.output_text.delta") == 2
    sdk_events = list(oai(app, script).responses.create(model=M, input="hi", stream=True))  # ends, no hang
    assert sdk_events[-1].type == "response.failed"
    assert oai(app).responses.retrieve(failed["id"]).status == "failed"  # stored as failed
    with pytest.raises(openai.BadRequestError):  # a failed response cannot be continued
        oai(app, "hello").responses.create(model=M, input="again", previous_response_id=failed["id"])


@pytest.mark.parametrize("script", ["reset", "error-500"])
def test_12_non_stream_failure(app: Appliance, script: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        oai(app, script).responses.create(model=M, input="hi")
    assert info.value.status_code >= 500
    assert isinstance(info.value, openai.InternalServerError)
    assert {"message", "type", "param", "code"} <= set(info.value.body)


def test_13_request_validation(app: Appliance) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cases = [({"input": "x"}, "model"), ({"model": M, "input": 42}, "input"),
             ({"model": M, "input": "x", "previous_response_id": "resp_1", "conversation": "conv_1"}, None),
             ({"model": M, "input": "x", "background": True}, "background")]
    for body, param in cases:
        response = httpx.post(app.url + "/v1/responses", json=body, headers=headers, timeout=30)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and set(error) >= {"message", "type", "param", "code"}
        if param is not None:
            assert error["param"] == param
        else:
            assert error["param"] in ("conversation", "previous_response_id")
    with pytest.raises(openai.BadRequestError) as info:
        oai(app, "hello").responses.create(model=M, input=42)  # type: ignore[arg-type]
    assert info.value.param == "input"
    raw = oai(app, "hello").responses.with_raw_response.create(  # hosted tools: dropped, with a warning header
        model=M, input="x", tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}, WEATHER_FN])
    assert raw.http_response.status_code == 200 and raw.headers["x-appliance-dropped-tools"] == "file_search"
    assert [t.type for t in raw.parse().tools] == ["function"]
    with pytest.raises(openai.AuthenticationError):
        oai(app, "hello", key="sk-app-not-a-key-000000000000000000000000000000").responses.create(model=M, input="x")


# ------------------------------------------------------------------------------------------ 14-17: WebSocket mode


def ws_connect(app: Appliance, **headers: str) -> websockets.sync.client.ClientConnection:
    return websockets.sync.client.connect(app.url.replace("http://", "ws://") + "/v1/responses",
                                          additional_headers={"Authorization": f"Bearer {ADMIN_KEY}", **headers})


def ws_turn(ws: websockets.sync.client.ClientConnection, frame: dict[str, Any] | str) -> list[dict[str, Any]]:
    """Send one frame; the frames back up to a terminal event or an error frame, each validated."""
    ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return ws_read(ws)


def ws_read(ws: websockets.sync.client.ClientConnection) -> list[dict[str, Any]]:
    frames = []
    while True:
        message = ws.recv(timeout=30)
        assert isinstance(message, str)  # JSON text frames, no SSE framing
        frame = json.loads(message)
        validate_ws_frame(frame)
        frames.append(frame)
        if frame["type"] in (*TERMINAL, "error"):
            return frames


def test_14_websocket_happy_path_and_continuation(app: Appliance, fake_openai: FakeOpenAI) -> None:
    with ws_connect(app) as ws:
        first = ws_turn(ws, {"type": "response.create", "model": "mock/script-hello", "input": "hi", "store": False})
        assert [f["type"] for f in first] == TEXT_EVENTS
        assert [f["sequence_number"] for f in first] == list(range(len(first)))
        done = first[-1]["response"]
        second = ws_turn(ws, {"type": "response.create", "model": "mock/script-hello", "previous_response_id":
                              done["id"], "input": [{"role": "user", "content": "more"}]})
        assert second[-1]["type"] == "response.completed" and second[0]["sequence_number"] == 0
        assert fake_openai.last_chat()["messages"] == [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "more"}]
    with pytest.raises(openai.NotFoundError):
        oai(app).responses.retrieve(done["id"])


def test_14_websocket_through_the_sdk(app: Appliance, fake_openai: FakeOpenAI) -> None:
    """The same turns through the openai SDK's own WebSocket client (responses.connect)."""
    with oai(app).responses.connect(max_retries=0) as connection:
        connection.response.create(model="mock/script-hello", input="hi", store=False)
        first = _sdk_turn(connection)
        assert [e.type for e in first] == TEXT_EVENTS
        connection.response.create(model="mock/script-hello", previous_response_id=first[-1].response.id,
                                   input=[{"role": "user", "content": "more"}])
        second = _sdk_turn(connection)
    assert second[-1].type == "response.completed" and second[0].sequence_number == 0
    assert [m["role"] for m in fake_openai.last_chat()["messages"]] == ["user", "assistant", "user"]


def _sdk_turn(connection: Any) -> list[Any]:
    events = []
    for event in connection:
        events.append(event)
        if event.type in (*TERMINAL, "error"):
            return events
    raise AssertionError(f"the socket closed after {[e.type for e in events]}")


def test_15_websocket_errors_keep_the_socket(app: Appliance) -> None:
    with ws_connect(app) as ws:
        (missing,) = ws_turn(ws, {"type": "response.create", "model": "mock/script-hello", "input": "x",
                                  "previous_response_id": "resp_missing"})
        assert missing["type"] == "error" and missing["status"] == 400
        assert {k: v for k, v in missing["error"].items() if k != "message"} == {
            "type": "invalid_request_error", "code": "previous_response_not_found", "param": "previous_response_id"}
        assert missing["error"]["message"]
        for bad in ("not json", json.dumps({"type": "session.update"})):
            (error,) = ws_turn(ws, bad)
            assert error["type"] == "error" and error["status"] == 400
            assert error["error"]["type"] == "invalid_request_error"
        last = ws_turn(ws, {"type": "response.create", "model": "mock/script-hello", "input": "x"})
        assert last[-1]["type"] == "response.completed"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        ws_connect(app, Authorization="Bearer sk-app-bad")
    assert refused.value.response.status_code == 401


def test_16_websocket_one_response_in_flight(app: Appliance, fake_openai: FakeOpenAI) -> None:
    before = len(fake_openai.chats())
    with ws_connect(app) as ws:
        for text in ("one", "two"):
            ws.send(json.dumps({"type": "response.create", "model": "mock/script-hello-slow", "input": text}))
        first, second = ws_read(ws), ws_read(ws)
    assert first[-1]["type"] == second[-1]["type"] == "response.completed"
    assert {f["response"]["id"] for f in first if "response" in f} != {s["response"]["id"] for s in second
                                                                         if "response" in s}
    assert [f["sequence_number"] for f in second] == list(range(len(second)))
    seen = fake_openai.chats()[before:]
    assert [s.body["messages"][-1]["content"] for s in seen] == ["one", "two"]
    assert seen[1].at >= seen[0].finished_at  # type: ignore[operator]


def test_17_websocket_warmup_and_eviction(app: Appliance, fake_openai: FakeOpenAI) -> None:
    tools = [WEATHER_FN]
    with ws_connect(app) as ws:
        before = len(fake_openai.chats())
        warm = ws_turn(ws, {"type": "response.create", "model": "mock/script-hello", "generate": False,
                            "store": False, "instructions": "I", "tools": tools,
                            "input": [{"role": "user", "content": "context"}]})
        assert [(f["type"], f["sequence_number"]) for f in warm] == [("response.created", 0),
                                                                     ("response.completed", 1)]
        assert warm[-1]["response"]["output"] == [] and len(fake_openai.chats()) == before
        go = ws_turn(ws, {"type": "response.create", "model": "mock/script-hello", "store": False,
                          "previous_response_id": warm[-1]["response"]["id"], "instructions": "I", "tools": tools,
                          "input": "go"})
        assert go[-1]["type"] == "response.completed"
        sent = fake_openai.last_chat()
        assert sent["messages"] in (
            [{"role": "system", "content": "I"}, {"role": "user", "content": "context"},
             {"role": "user", "content": "go"}],
            [{"role": "system", "content": "I"}, {"role": "user", "content": "context\ngo"}])
        assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                                   "parameters": WEATHER_SCHEMA}}]
        follow = {"type": "response.create", "model": "mock/script-error-400", "store": False,
                  "previous_response_id": go[-1]["response"]["id"], "input": "next"}
        (failed,) = ws_turn(ws, follow)
        assert failed["type"] == "error" and failed["status"] == 400
        (evicted,) = ws_turn(ws, {**follow, "model": "mock/script-hello"})
        assert evicted["error"]["code"] == "previous_response_not_found"


# ------------------------------------------------------------------------------------------ 18-25: Messages


def test_18_messages_non_stream_text(app: Appliance, fake_openai: FakeOpenAI) -> None:
    message = ant(app, "hello").messages.create(model=M, max_tokens=64, system=[{"type": "text", "text": "Be terse"}],
                                                messages=[{"role": "user", "content": "Hi"}])
    assert message.id.startswith("msg_") and (message.type, message.role) == ("message", "assistant")
    assert message.content == [anthropic.types.TextBlock(type="text", text="Hello!")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None and message.model == M
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0) == 10
    assert usage.output_tokens == 3
    sent = fake_openai.last_chat()
    assert sent["messages"] == [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Hi"}]
    assert sent["max_tokens"] == 64


@pytest.mark.llamacpp
def test_18_messages_non_stream_text_real_server(app: Appliance, llamacpp_url: str) -> None:
    message = ant(app).messages.create(model=TINY, max_tokens=16, system=[{"type": "text", "text": "Be terse"}],
                                       messages=[{"role": "user", "content": "Hi"}])
    assert message.id.startswith("msg_") and message.type == "message" and message.model == TINY
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def _check_messages_text_stream(frames: list[tuple[str, dict]], output_tokens: int | None) -> str:
    names = [name for name, _ in frames]
    assert names[0] == "message_start" and names[-1] == "message_stop" and names.count("message_stop") == 1
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert frames[1] == ("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}})
    middle = [name for name in names[2:-3] if name != "ping"]
    assert middle and set(middle) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert frames[-3][1]["index"] == 0
    delta = frames[-2][1]
    assert delta["delta"]["stop_reason"] in (("end_turn",) if output_tokens else ("end_turn", "max_tokens"))
    if output_tokens is not None:
        assert delta["usage"]["output_tokens"] == output_tokens
    return "".join(d["delta"]["text"] for name, d in frames if name == "content_block_delta")


def test_19_messages_stream_text(app: Appliance) -> None:
    body = {"model": M, "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    text = _check_messages_text_stream(raw_sse(app, "/v1/messages", body, "hello"), 3)
    assert text == "Hello!"
    events = list(ant(app, "hello").messages.create(**body, stream=True))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    with ant(app, "hello").messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == text and final.usage.input_tokens == 10 and final.usage.output_tokens == 3


@pytest.mark.llamacpp
def test_19_messages_stream_text_real_server(app: Appliance, llamacpp_url: str) -> None:
    body = {"model": TINY, "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
    text = _check_messages_text_stream(raw_sse(app, "/v1/messages", body), None)
    with ant(app).messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert text and final.usage.input_tokens > 0 and final.usage.output_tokens > 0


TOOL_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.mark.parametrize("script", ["checking-weather", "weather-finish-stop"])
def test_20_messages_tool_use_non_stream(app: Appliance, fake_openai: FakeOpenAI, script: str) -> None:
    client = ant(app, script)
    message = client.messages.create(model=M, max_tokens=64, messages=[{"role": "user", "content": "Weather?"}],
                                     tools=[WEATHER_TOOL], tool_choice={"type": "any"})
    sent = fake_openai.last_chat()
    assert sent["tools"] == CHAT_WEATHER and sent["tool_choice"] == "required"
    tool = message.content[-1]
    assert tool.type == "tool_use" and TOOL_ID.match(tool.id) and tool.name == "get_weather"
    assert tool.input == {"city": "Paris"} and message.stop_reason == "tool_use"
    if script == "checking-weather":
        assert message.content[0].type == "text" and message.content[0].text == "Checking"
    choices = [({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
               ({"type": "none"}, "none")]
    for choice, expected in choices:
        client.messages.create(model=M, max_tokens=64, messages=[{"role": "user", "content": "W?"}],
                               tools=[WEATHER_TOOL], tool_choice=choice)
        assert fake_openai.last_chat()["tool_choice"] == expected
    client.messages.create(model=M, max_tokens=64, messages=[{"role": "user", "content": "W?"}], tools=[WEATHER_TOOL],
                           tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert fake_openai.last_chat()["parallel_tool_calls"] is False


@pytest.mark.parametrize(("script", "inputs"), [
    ("checking-weather", [{"city": "Paris"}]), ("two-calls", [{"city": "Paris"}, {"city": "Rome"}]),
    ("weather-one-chunk", [{"city": "Paris"}]), ("weather-dict", [{"city": "Paris"}]), ("weather-empty", [{}])])
def test_21_messages_tool_use_stream(app: Appliance, script: str, inputs: list[dict[str, Any]]) -> None:
    body = {"model": M, "max_tokens": 64, "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [WEATHER_TOOL]}
    frames = raw_sse(app, "/v1/messages", body, script)
    starts = [d for name, d in frames if name == "content_block_start"]
    assert [d["index"] for d in starts] == list(range(len(starts)))  # dense, in start order
    tools = [d for d in starts if d["content_block"]["type"] == "tool_use"]
    assert len(tools) == len(inputs)
    for block, expected in zip(tools, inputs, strict=True):
        head = block["content_block"]
        assert set(head) == {"type", "id", "name", "input"} and head["input"] == {} and head["name"] == "get_weather"
        index = block["index"]
        partial = "".join(d["delta"]["partial_json"] for name, d in frames
                          if name == "content_block_delta" and d["index"] == index)
        assert json.loads(partial or "{}") == expected
        assert ("content_block_stop", {"type": "content_block_stop", "index": index}) in frames
    assert frames[-2][1]["delta"]["stop_reason"] == "tool_use"
    with ant(app, script).messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert final.content[-1].input == inputs[-1] and final.stop_reason == "tool_use"


def test_22_tool_result_round_trip_with_images(app: Appliance, fake_openai: FakeOpenAI) -> None:
    ant(app, "hello").messages.create(model=M, max_tokens=64, messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking"}, {
            "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "text", "text": "also this"}, {
            "type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "text", "text": "sunny"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}])
    assert fake_openai.last_chat()["messages"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": WEATHER_ARGS}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": "also this"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


@pytest.mark.parametrize(("script", "extra", "reason", "sequence"), [
    ("long", {"max_tokens": 16}, "max_tokens", None),
    ("stop-end", {"stop_sequences": ["END"]}, "stop_sequence", "END"),
    ("filtered", {}, "refusal", None)])
def test_23_stop_reasons(app: Appliance, fake_openai: FakeOpenAI, script: str, extra: dict[str, Any], reason: str,
                         sequence: str | None) -> None:
    body = {"model": M, "max_tokens": 64, "messages": [{"role": "user", "content": "Count"}], **extra}
    message = ant(app, script).messages.create(**body)
    if sequence is not None:
        assert fake_openai.last_chat()["stop"] == ["END"]
    assert (message.stop_reason, message.stop_sequence) == (reason, sequence)
    assert all("END" not in block.text for block in message.content if block.type == "text")
    frames = raw_sse(app, "/v1/messages", body, script)
    delta = next(d for name, d in frames if name == "message_delta")["delta"]
    assert (delta["stop_reason"], delta["stop_sequence"]) == (reason, sequence)


def test_24_messages_errors(app: Appliance) -> None:
    response = httpx.post(app.url + "/v1/messages", headers={"x-api-key": ADMIN_KEY, HEADER: "hello"}, timeout=30,
                          json={"model": M, "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    hi = {"max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
    failures = [
        (ant(app, "hello", key="sk-app-not-a-key-000000000000000000000000000000"), M,
         anthropic.AuthenticationError, "authentication_error", 401),
        (ant(app, "hello"), "no-such-model", anthropic.NotFoundError, "not_found_error", 404),
        (ant(app, "error-500"), M, anthropic.InternalServerError, "api_error", 500),
        (ant(app, "hello"), "all-down", anthropic.OverloadedError, "overloaded_error", 529)]
    for client, model, exception, kind, status in failures:
        with pytest.raises(exception) as info:
            client.messages.create(model=model, **hi)
        assert info.value.status_code == status
        assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == kind
    with pytest.raises(anthropic.APIStatusError) as cut, ant(app, "reset").messages.stream(model=M, **hi) as stream:
        for _ in stream:
            pass
    assert cut.value.body["type"] == "error"
    frames = raw_sse(app, "/v1/messages", {"model": M, **hi}, "reset")
    assert frames[-1][0] == "error" and "message_stop" not in [name for name, _ in frames]
    assert frames[-1][1]["error"]["type"] == "api_error"


COUNT_BODY = {"system": "S", "messages": [{"role": "user", "content": "What is the weather in Paris today?"}]}


def test_25_count_tokens(app: Appliance, fake_openai: FakeOpenAI) -> None:
    before = len(fake_openai.chats())
    client = ant(app)
    plain = client.messages.count_tokens(model=M, **COUNT_BODY)
    with_tools = client.messages.count_tokens(model=M, tools=[WEATHER_TOOL], **COUNT_BODY)
    beta = client.beta.messages.count_tokens(model=M, tools=[WEATHER_TOOL], **COUNT_BODY)
    raw = httpx.post(app.url + "/v1/messages/count_tokens?beta=true", headers={"x-api-key": ADMIN_KEY}, timeout=30,
                     json={"model": M, "tools": [WEATHER_TOOL], **COUNT_BODY})
    assert isinstance(plain.input_tokens, int) and plain.input_tokens > 0
    assert with_tools.input_tokens > plain.input_tokens
    assert beta.input_tokens == raw.json()["input_tokens"] == with_tools.input_tokens
    assert raw.headers["x-appliance-token-count"] == "estimate"
    assert len(fake_openai.chats()) == before  # no generation reached the backend


@pytest.mark.llamacpp
def test_25_count_tokens_real_server(app: Appliance, llamacpp_url: str) -> None:
    client = ant(app)
    counted = client.messages.count_tokens(model=TINY, **COUNT_BODY)
    created = client.messages.create(model=TINY, max_tokens=1, **COUNT_BODY)
    prompt = created.usage.input_tokens + (created.usage.cache_read_input_tokens or 0)
    # The gateway estimates for this backend (no tokenizer endpoint it can render the template with):
    # 21 against 23 for this body when measured, inside the spec's tolerance of 2.
    assert abs(counted.input_tokens - prompt) <= 2
    assert client.messages.count_tokens(model=TINY, tools=[WEATHER_TOOL], **COUNT_BODY).input_tokens > \
        counted.input_tokens
