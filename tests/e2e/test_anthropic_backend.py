"""A `type = "anthropic"` backend: chat translated to Messages and back, Messages passed through.

A private appliance (2 workers) in front of the fake Anthropic API (tests/fakes/anthropic_upstream.py),
driven by the official openai and anthropic SDKs, with a chat backend (the OpenAI fake) to fall back to.
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
    USAGE,
    VERSION,
    FakeAnthropic,
    count_of,
)
from tests.fakes.openai_upstream import REPLY_TEXT, FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.ledger import logged

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
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake: FakeAnthropic,
        fake_openai: FakeOpenAI) -> Appliance:
    """Two backends on the fake: one discovered through its /v1 URL, one configured on the bare root URL.

    ``claude-sonnet-*`` reaches the fake's text model; ``claude-fallback`` starts on the overloaded model and
    falls back to a chat backend.
    """
    backend = {"type": "anthropic", "api_key": API_KEY}
    app = Appliance(tmp_path_factory.mktemp("anthropic"), workers=2, config={
        "discovery": {"enabled": False, "interval_s": 2},
        "backends": [{"name": "claude", "url": fake.url + "/v1", **backend},
                     {"name": "claude-busy", "url": fake.url, "discover": False, "models": [OVERLOADED_MODEL],
                      **backend},
                     {"name": "claude-spare", "url": fake.url, "discover": False, "models": [OVERLOADED_MODEL],
                      **backend},  # for the Messages tests, so their failures open no breaker of the chat tests
                     {"name": "chat", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]}],
        "models": [{"name": "claude-sonnet-*", "target": f"claude/{TEXT_MODEL}"},
                   {"name": "claude-fallback", "targets": [f"claude-spare/{OVERLOADED_MODEL}", "chat/fake-chat"]}],
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


# ------------------------------------------------------------------------------------------ Messages passed through

# Fields a translation to chat would drop: the fake must see them as the client sent them.
EXTRAS = {"thinking": {"type": "enabled", "budget_tokens": 1024}, "metadata": {"user_id": "user-7"}, "top_k": 5,
          "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]}
ANTHROPIC_HEADERS = {"x-api-key": ADMIN_KEY, "anthropic-version": "2099-01-01", "anthropic-beta": "fake-beta-1"}


@pytest.fixture(scope="module")
def claude(app: Appliance) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0, timeout=30)


def test_messages_pass_through(app: Appliance, claude: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=USER, extra_body={**EXTRAS, "retries": 0})
    message = raw.parse()
    sent = fake.last()
    assert sent.body == {"model": TEXT_MODEL, "max_tokens": 64, "messages": USER, **EXTRAS}  # gateway fields gone
    assert sent.headers["x-api-key"] == API_KEY and sent.headers["anthropic-version"] == VERSION
    assert message.id == "msg_fake01"  # the backend's own answer, not a re-rendered one
    assert message.content[0].text == "".join(TEXT_PIECES) and message.model == TEXT_MODEL
    assert message.usage.input_tokens == USAGE["input_tokens"]
    assert message.usage.cache_read_input_tokens == USAGE["cache_read_input_tokens"]
    row = logged(app, raw.headers["x-request-id"])
    assert (row["backend"], row["backend_model"], row["endpoint"]) == ("claude", TEXT_MODEL, "/v1/messages")
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (25, 7, 4)
    assert row["estimated"] == 0 and row["status"] == 200


def test_messages_stream_passes_through_byte_for_byte(app: Appliance, fake: FakeAnthropic) -> None:
    body = {"model": TOOLS_MODEL, "max_tokens": 64, "messages": USER, "stream": True, **EXTRAS}
    with httpx.stream("POST", app.url + "/v1/messages", json=body, headers=ANTHROPIC_HEADERS,
                      timeout=30) as response:
        assert response.status_code == 200
        received = response.read()
    sent = fake.last()
    assert sent.body == body and sent.headers["anthropic-version"] == VERSION
    assert sent.headers["anthropic-beta"] == "fake-beta-1" and ADMIN_KEY not in str(sent.headers)
    assert received == sent.streamed and received.endswith(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    row = logged(app, response.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (25, 7, 4)
    assert row["stream"] == 1 and row["error_code"] is None and row["ttft_ms"] is not None


def test_messages_stream_accumulated_by_the_sdk(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model=TOOLS_MODEL, max_tokens=64, system="Be brief.", messages=USER,
                                tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["text", "tool_use"]
    assert final.content[0].text == TOOLS_TEXT and final.content[1].input == {"city": "Paris"}
    assert final.content[1].id == TOOL_ID
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == USAGE["output_tokens"]
    assert final.usage.input_tokens == USAGE["input_tokens"]


def test_messages_errors_pass_in_anthropic_shape(app: Appliance, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.OverloadedError) as busy:
        claude.messages.create(model=f"claude-spare/{OVERLOADED_MODEL}", max_tokens=8, messages=USER,
                               extra_headers=NO_RETRY)
    assert busy.value.status_code == 529 and busy.value.body["error"]["type"] == "overloaded_error"
    assert busy.value.body["error"]["message"] == "Overloaded"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="claude/claude-nonexistent", max_tokens=8, messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error"
    for model in (BROKEN_MODEL, CUT_MODEL):  # the backend's own error event, or ours when it just stops
        with pytest.raises(anthropic.APIStatusError), claude.messages.stream(
                model=model, max_tokens=8, messages=USER) as stream:
            for _ in stream:
                pass
    with httpx.stream("POST", app.url + "/v1/messages", headers=ANTHROPIC_HEADERS, timeout=30, json={
            "model": BROKEN_MODEL, "max_tokens": 8, "messages": USER, "stream": True}) as response:
        text = response.read().decode()
    assert text.count("event: error") == 1 and "message_stop" not in text
    row = logged(app, response.headers["x-request-id"])
    assert row["error_code"] == "backend_overloaded" and row["prompt_tokens"] == 25


def test_messages_only_anthropic_takes_pass_through_untranslated(app: Appliance, claude: anthropic.Anthropic,
                                                                fake: FakeAnthropic) -> None:
    """A PDF document has no chat equivalent: refused for a chat backend, passed to an Anthropic one."""
    pdf = [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
        {"type": "text", "text": "Summarise it."}]}]
    raw = claude.messages.with_raw_response.create(model=TEXT_MODEL, max_tokens=32, messages=pdf)
    assert fake.last().body == {"model": TEXT_MODEL, "max_tokens": 32, "messages": pdf}
    assert raw.parse().id == "msg_fake01"
    assert logged(app, raw.headers["x-request-id"])["prompt_tokens"] == 25  # Anthropic's count, not the estimate
    with pytest.raises(anthropic.BadRequestError) as refused:  # the chain reaches a chat backend
        claude.messages.create(model="claude-fallback", max_tokens=32, messages=pdf)
    assert "document" in refused.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as missing:
        claude.messages.create(model=TEXT_MODEL, max_tokens=None, messages=pdf)  # type: ignore[arg-type]
    assert "max_tokens" in missing.value.body["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_messages_retried_on_a_failing_backend(claude: anthropic.Anthropic, fake: FakeAnthropic, stream: bool) -> None:
    before = len(fake.seen("/v1/messages"))
    fake.fail_next = 1
    raw = claude.messages.with_raw_response.create(model=TEXT_MODEL, max_tokens=16, messages=USER, stream=stream,
                                                   extra_body={"retries": 1})
    sent = fake.seen("/v1/messages")[before:]
    assert len(sent) == 2 and sent[0].body == sent[1].body and "retries" not in sent[0].body
    assert raw.headers["x-retry-count"] == "1" and raw.headers["x-appliance-attempts"] == "2"
    if stream:
        assert [event.type for event in raw.parse()][-1] == "message_stop"
    else:
        assert raw.parse().id == "msg_fake01"


@pytest.mark.parametrize("stream", [False, True])
def test_messages_fall_back_to_a_chat_backend(claude: anthropic.Anthropic, fake_openai: FakeOpenAI,
                                              stream: bool) -> None:
    raw = claude.messages.with_raw_response.create(model="claude-fallback", max_tokens=32, messages=USER,
                                                   stream=stream, extra_headers=NO_RETRY, extra_body=EXTRAS)
    assert raw.headers["x-fallback-from"] == f"claude-spare/{OVERLOADED_MODEL}"
    assert raw.headers["x-appliance-backend"] == "chat"
    if stream:
        events = list(raw.parse())
        text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
        assert events[0].type == "message_start" and events[-1].type == "message_stop"
    else:
        text = raw.parse().content[0].text
    assert text == REPLY_TEXT
    sent = fake_openai.requests[-1].body  # translated: chat fields only
    assert sent["model"] == "fake-chat" and sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "thinking" not in sent and "metadata" not in sent


def test_count_tokens_from_the_backend_else_estimated(app: Appliance, claude: anthropic.Anthropic,
                                                      fake: FakeAnthropic) -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    raw = claude.messages.with_raw_response.count_tokens(model="claude-sonnet-4-5", messages=USER, tools=tools,
                                                         system="Be brief.")
    sent = fake.last("/v1/messages/count_tokens")
    assert sent.body == {"model": TEXT_MODEL, "messages": USER, "tools": tools, "system": "Be brief."}
    assert raw.parse().input_tokens == count_of(sent.body)
    assert raw.headers["x-appliance-token-count"] == "backend" and sent.headers["x-api-key"] == API_KEY
    fake.count_tokens = False
    try:
        raw = claude.beta.messages.with_raw_response.count_tokens(model=TEXT_MODEL, messages=USER)
    finally:
        fake.count_tokens = True
    assert raw.headers["x-appliance-token-count"] == "estimate" and raw.parse().input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="claude/claude-nonexistent", messages=USER)


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
    # A chat model for embeddings: 501 naming the model, never retried.
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model=TEXT_MODEL, input="hello")
    assert caught.value.body["code"] == "unsupported" and caught.value.body["param"] == "model"
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=TEXT_MODEL, prompt="Once")
    assert caught.value.body["code"] == "unsupported" and caught.value.body["param"] == "model"
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
