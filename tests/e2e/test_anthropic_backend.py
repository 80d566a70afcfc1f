"""A `type = "anthropic"` backend, driven by the official openai SDK: chat translated to Messages and back.

A private appliance (2 workers) in front of the fake Anthropic API (tests/fakes/anthropic_upstream.py).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes.anthropic_upstream import (
    API_KEY,
    BROKEN_MODEL,
    CUT_MODEL,
    JSON_PIECES,
    OVERLOADED_MODEL,
    TEXT_MODEL,
    TEXT_PIECES,
    TOOL_ID,
    TOOLS_MODEL,
    TOOLS_TEXT,
    VERSION,
    FakeAnthropic,
)
from tests.support.appliance import ADMIN_KEY, Appliance

pytestmark = pytest.mark.frozen

USER = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NO_RETRY = {"X-Appliance-No-Retry": "true"}


@pytest.fixture(scope="module")
def fake(request: pytest.FixtureRequest) -> FakeAnthropic:
    server = FakeAnthropic()
    server.start()
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake: FakeAnthropic) -> Appliance:
    """Two backends on the fake: one discovered through its /v1 URL, one configured on the bare root URL."""
    backend = {"type": "anthropic", "api_key": API_KEY}
    app = Appliance(tmp_path_factory.mktemp("anthropic"), workers=2, config={
        "discovery": {"enabled": False, "interval_s": 2},
        "backends": [{"name": "claude", "url": fake.url + "/v1", **backend},
                     {"name": "claude-busy", "url": fake.url, "discover": False, "models": [OVERLOADED_MODEL],
                      **backend}],
    })
    request.addfinalizer(app.stop)  # before start: a failed start still stops the process
    app.start()
    app.wait_ready()
    return app


@pytest.fixture(scope="module")
def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)


def test_chat(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    reply = client.chat.completions.create(model=TEXT_MODEL, messages=USER, max_tokens=50)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == TEXT_MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "".join(TEXT_PIECES)
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    # Anthropic's input_tokens exclude cache reads: the prompt is 21 fresh + 4 read from the cache.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (25, 7, 32)
    assert reply.usage.prompt_tokens_details is not None and reply.usage.prompt_tokens_details.cached_tokens == 4
    sent = fake.last()
    assert sent.body == {"model": TEXT_MODEL, "max_tokens": 50, "messages": USER, "stream": False}
    assert sent.headers["anthropic-version"] == VERSION
    assert sent.headers["content-type"] == "application/json"


def test_system_message_is_hoisted(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    client.chat.completions.create(model=TEXT_MODEL, temperature=1.5, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Be kind."}, *USER])
    sent = fake.last().body
    assert sent["system"] == "Be brief.\nBe kind."
    assert sent["messages"] == USER
    assert sent["temperature"] == 1.0  # OpenAI's scale goes to 2, Anthropic's stops at 1
    assert isinstance(sent["max_tokens"], int) and sent["max_tokens"] > 0  # required by Anthropic


def test_streaming_with_usage(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    chunks = list(client.chat.completions.create(model=TEXT_MODEL, messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(TEXT_PIECES)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (25, 7)
    assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    assert fake.last().body["stream"] is True
    assert "stream_options" not in fake.last().body  # a chat field Anthropic would refuse


def raw_stream(app: Appliance, model: str) -> list[str]:
    """The data payloads of a streamed chat answer, as on the wire."""
    response = httpx.post(app.url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          json={"model": model, "messages": USER, "stream": True})
    assert response.status_code == 200, app.log()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "event:" not in response.text  # Anthropic's event names stay upstream
    return [event.removeprefix("data: ") for event in response.text.split("\n\n") if event.startswith("data: ")]


def test_raw_stream_ends_once_with_done(app: Appliance) -> None:
    data = raw_stream(app, TEXT_MODEL)
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(chunk["choices"] for chunk in chunks)  # the usage chunk was not asked for: dropped
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("model", "code"), [(BROKEN_MODEL, "backend_overloaded"), (CUT_MODEL, "backend_error")])
def test_stream_failing_midway(app: Appliance, model: str, code: str) -> None:
    data = raw_stream(app, model)
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-2])
    assert text == "".join(TEXT_PIECES)  # what came before the failure reached the client
    assert json.loads(data[-2])["error"]["code"] == code
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1


def test_tool_call(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    reply = client.chat.completions.create(model=TOOLS_MODEL, messages=USER, tools=[WEATHER_TOOL],
                                           tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == TOOLS_TEXT
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == (TOOL_ID, "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    sent = fake.last().body
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any"}

    client.chat.completions.create(model=TOOLS_MODEL, tools=[WEATHER_TOOL], messages=[
        *USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}])
    assert fake.last().body["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": TOOL_ID, "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": TOOL_ID, "content": "Sunny, 21 C"}]}]


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=TOOLS_MODEL, messages=USER, tools=[WEATHER_TOOL],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TOOLS_TEXT
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].index == 0 and calls[0].id == TOOL_ID and calls[0].function.name == "get_weather"
    assert {tc.index for tc in calls} == {0}
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert arguments == "".join(JSON_PIECES) and json.loads(arguments) == {"city": "Paris"}
    assert len(calls) > 2  # the fragments arrive as Anthropic sent them, not buffered into one
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_messages_surface_round_trip(app: Appliance, fake: FakeAnthropic) -> None:
    """An Anthropic client on /v1/messages reaches the Anthropic backend through the chat mapping, both ways."""
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0, timeout=30)
    with claude.messages.stream(model=TOOLS_MODEL, max_tokens=64, system="Be brief.", messages=USER,
                                tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["text", "tool_use"]
    assert final.content[0].text == TOOLS_TEXT and final.content[1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 7
    sent = fake.last().body
    assert sent["system"] == "Be brief." and sent["messages"] == USER and sent["max_tokens"] == 64


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_upstream(client: openai.OpenAI, fake: FakeAnthropic, stream: bool) -> None:
    before = len(fake.seen("/v1/messages"))
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=f"claude-busy/{OVERLOADED_MODEL}", messages=USER, stream=stream,
                                       extra_headers=NO_RETRY)
    error = caught.value
    assert error.status_code == 503
    assert error.body["code"] == "backend_overloaded" and error.body["type"] == "server_error"
    assert error.body["message"] == "Overloaded"
    assert 1 <= int(error.response.headers["retry-after"]) <= 120
    assert len(fake.seen("/v1/messages")) == before + 1


def test_root_url_without_v1(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    reply = client.chat.completions.create(model=f"claude-busy/{TEXT_MODEL}", messages=USER)
    assert reply.choices[0].message.content == "".join(TEXT_PIECES)
    assert fake.last().path == "/v1/messages"


def test_unknown_model_upstream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="claude/claude-nonexistent", messages=USER)
    assert caught.value.body["code"] == "model_not_found"


def test_embeddings_and_completions_are_unsupported(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    before = len(fake.requests)
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model=TEXT_MODEL, input="hello")
    assert caught.value.status_code == 501 and caught.value.body["code"] == "unsupported"
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=TEXT_MODEL, prompt="Once")
    assert caught.value.status_code == 501 and caught.value.body["code"] == "unsupported"
    assert [seen.path for seen in fake.requests[before:] if seen.path != "/v1/models"] == []


def test_models_are_listed_with_their_facts(client: openai.OpenAI, fake: FakeAnthropic) -> None:
    listed: dict[str, Any] = {m.id: m.model_dump() for m in client.models.list().data}
    entry = listed[TEXT_MODEL]
    assert entry["context_window"] == 200000
    assert entry["capabilities"]["chat"] is True and entry["capabilities"]["embeddings"] is False
    assert entry["capabilities"]["vision"] is True and entry["capabilities"]["reasoning"] is False
    assert {"id": "claude", "kind": "anthropic", "state": "ready", "loaded": None} in entry["backends"]
    assert fake.last("/v1/models").query == {"limit": "1000"}


def test_only_the_backend_key_reaches_anthropic(fake: FakeAnthropic) -> None:
    assert fake.requests
    for seen in fake.requests:
        assert seen.headers.get("x-api-key") == API_KEY
        assert "authorization" not in seen.headers
        assert not any(ADMIN_KEY in value for value in seen.headers.values())
