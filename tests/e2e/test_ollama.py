"""O1-O6: the native Ollama provider through the official openai SDK, against the Ollama emulator.

The emulator is shared by the session's gateway: each test scripts the answer it needs, calls, and
asserts; the emulator is reset around every test.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.ollama import BUSY_MESSAGE, FakeOllama
from tests.support.appliance import ADMIN_KEY, Appliance

MODEL = "llama3.2:latest"
USER = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOKYO_CALL = [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]


@pytest.fixture(autouse=True)
def fake(fake_ollama: FakeOllama) -> Iterator[FakeOllama]:
    fake_ollama.reset()
    yield fake_ollama
    fake_ollama.reset()


def post_raw(gateway: Appliance, path: str, body: dict[str, Any]) -> httpx.Response:
    """The gateway's answer as bytes on the wire, for what the SDK hides (the SSE framing)."""
    return httpx.post(gateway.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def sse_data(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [event.removeprefix("data: ") for event in text.split("\n\n") if event.startswith("data: ")]


def poll_model(client: openai.OpenAI, model_id: str, ready: Callable[[dict[str, Any]], bool],
               timeout: float = 10) -> dict[str, Any]:
    """The /v1/models entry once ``ready`` holds: workers refresh their catalogs every 2 s."""
    deadline = time.monotonic() + timeout
    entry: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        listed = {m.id: m.model_dump() for m in client.models.list().data}
        entry = listed.get(model_id)
        if entry is not None and ready(entry):
            return entry
        time.sleep(0.1)
    pytest.fail(f"/v1/models never showed the expected {model_id!r} entry; last seen: {entry}")


# ------------------------------------------------------------------------------------------ O1 chat


def test_o1_chat_non_streaming(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=["Hello!"], prompt_eval_count=26, eval_count=3, done_reason="stop")
    reply = client.chat.completions.create(model=MODEL, messages=USER)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert abs(reply.created - time.time()) < 60
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello!"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (26, 3, 29)
    sent = fake.last("/api/chat")
    assert sent["stream"] is False
    assert sent["model"] == MODEL
    assert sent["messages"] == [{"role": "user", "content": "Say hello"}]
    assert "options" not in sent  # nothing asked for: the Modelfile's defaults apply


@pytest.mark.parametrize("name", ["llama3.2", "ollama/llama3.2:latest"])
def test_o1_model_names_reach_the_tagged_model(client: openai.OpenAI, fake: FakeOllama, name: str) -> None:
    reply = client.chat.completions.create(model=name, messages=USER)
    assert reply.choices[0].message.content == "Hello from Ollama."
    assert fake.last("/api/chat")["model"] == MODEL


def test_o1_thinking_comes_back_as_reasoning(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=["42"], thinking="Six times seven.")
    reply = client.chat.completions.create(model=MODEL, messages=USER)
    message = reply.choices[0].message
    assert message.content == "42"
    assert message.model_extra["reasoning_content"] == "Six times seven."
    assert message.model_extra["reasoning"] == "Six times seven."
    # reasoning_effort becomes think, which this model cannot do: Ollama's 400 reaches the client.
    with pytest.raises(openai.BadRequestError, match="does not support thinking"):
        client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="low")
    assert fake.last("/api/chat")["think"] == "low"


def test_o1_completions_send_a_raw_prompt(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=[" there", " was"], prompt_eval_count=4, eval_count=2)
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=2)
    assert reply.id.startswith("cmpl-")
    assert reply.object == "text_completion"
    assert reply.choices[0].text == " there was"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 2)
    sent = fake.last("/api/generate")
    assert sent["prompt"] == "Once upon a time"
    assert sent["raw"] is True and sent["stream"] is False
    assert sent["options"] == {"num_predict": 2}


def test_o1_completions_take_one_prompt(client: openai.OpenAI, fake: FakeOllama) -> None:
    reply = client.completions.create(model=MODEL, prompt=["Only one"])
    assert reply.choices[0].text == "Hello from Ollama."
    assert fake.last("/api/generate")["prompt"] == "Only one"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=["one", "two"])
    assert caught.value.body["param"] == "prompt"


# ------------------------------------------------------------------------------------------ O2 streaming


def test_o2_streaming(client: openai.OpenAI, fake: FakeOllama) -> None:
    pieces = ["Hel", "lo", " there"]
    fake.script(MODEL, content_pieces=pieces, prompt_eval_count=12, eval_count=3)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == 12
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert fake.last("/api/chat")["stream"] is True


def test_o2_raw_stream_ends_with_done(gateway: Appliance, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=["a", "b"], eval_count=2)
    response = post_raw(gateway, "/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert response.status_code == 200, gateway.log()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    data = sse_data(response.text)
    assert data.count("[DONE]") == 1
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 2


def test_o2_no_usage_chunk_unless_asked(gateway: Appliance, fake: FakeOllama) -> None:
    response = post_raw(gateway, "/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True})
    chunks = [json.loads(d) for d in sse_data(response.text) if d != "[DONE]"]
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert response.text.endswith("data: [DONE]\n\n")


def test_o2_streamed_completions(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=[" upon", " a time"], eval_count=2)
    chunks = list(client.completions.create(model=MODEL, prompt="Once", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " upon a time"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    assert fake.last("/api/generate")["raw"] is True


# ------------------------------------------------------------------------------------------ O3 tools


def _follow_up(call_id: str, arguments: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 21 C"},
    ]


def _assert_follow_up_reached_ollama(fake: FakeOllama, call_id: str) -> None:
    messages = fake.last("/api/chat")["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Tokyo"}}
    assert messages[2] == {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather",
                           "tool_call_id": call_id}


def test_o3_tool_calls(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, tool_calls=TOKYO_CALL)
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert fake.last("/api/chat")["tools"] == [WEATHER_TOOL]

    follow = client.chat.completions.create(model=MODEL, messages=_follow_up(call.id, call.function.arguments),
                                            tools=[WEATHER_TOOL])
    assert follow.choices[0].finish_reason == "stop"
    _assert_follow_up_reached_ollama(fake, call.id)


def test_o3_tool_calls_streaming(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, tool_calls=TOKYO_CALL)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(calls) == 1
    assert calls[0].index == 0 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Tokyo"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    list(client.chat.completions.create(model=MODEL, messages=_follow_up(calls[0].id, calls[0].function.arguments),
                                        tools=[WEATHER_TOOL], stream=True))
    _assert_follow_up_reached_ollama(fake, calls[0].id)


def test_o3_ollama_ids_are_kept(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, tool_calls=[{"id": "call_ab12cd34", **TOKYO_CALL[0]}])
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    assert reply.choices[0].message.tool_calls[0].id == "call_ab12cd34"


# ------------------------------------------------------------------------------------------ O4 mapping


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"max_completion_tokens": 7}, {"num_predict": 7}),
    ({"max_tokens": 5}, {"num_predict": 5}),
    ({"stop": "END"}, {"stop": ["END"]}),
    ({"seed": 1, "temperature": 0.2}, {"seed": 1, "temperature": 0.2}),
    ({"top_p": 0.9, "frequency_penalty": 0.5, "presence_penalty": 0.25},
     {"top_p": 0.9, "frequency_penalty": 0.5, "presence_penalty": 0.25}),
])
def test_o4_options(client: openai.OpenAI, fake: FakeOllama, kwargs: dict[str, Any],
                    expected: dict[str, Any]) -> None:
    client.chat.completions.create(model=MODEL, messages=USER, **kwargs)
    assert fake.last("/api/chat")["options"] == expected  # nothing more: absent temperature stays absent


def test_o4_response_formats(client: openai.OpenAI, fake: FakeOllama) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    client.chat.completions.create(model=MODEL, messages=USER, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert fake.last("/api/chat")["format"] == schema
    reply = client.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"})
    assert fake.last("/api/chat")["format"] == "json"
    assert json.loads(reply.choices[0].message.content) == {}


def test_o4_images(client: openai.OpenAI, fake: FakeOllama) -> None:
    def image(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    client.chat.completions.create(model="llava", messages=image("data:image/png;base64,AAAA"))
    sent = fake.last("/api/chat")["messages"][0]
    assert sent == {"role": "user", "content": "What is this?", "images": ["AAAA"]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llava", messages=image("https://example.com/cat.png"))
    assert "image URLs are not currently supported" in caught.value.message
    # Ollama says the model has no vision: with no [vision] describer, the gateway refuses it itself.
    with pytest.raises(openai.InternalServerError, match="takes no images, and no describer model is set") as caught:
        client.chat.completions.create(model=MODEL, messages=image("data:image/png;base64,AAAA"))
    assert caught.value.code == "unsupported" and caught.value.param == "messages"


def test_o4_length_and_single_choice(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=["Hello", " wor"], done_reason="length")
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    before = len(fake.seen("/api/chat"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, n=2)
    assert caught.value.body["param"] == "n"
    assert len(fake.seen("/api/chat")) == before  # refused before reaching Ollama


# ------------------------------------------------------------------------------------------ O5 errors


def test_o5_model_not_found(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(MODEL, status=404, error="model 'x' not found")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["message"] == "model 'x' not found"
    with pytest.raises(openai.NotFoundError) as caught:  # a model only Ollama can judge
        client.chat.completions.create(model="ollama/missing:7b", messages=USER)
    assert caught.value.body["code"] == "model_not_found"
    assert "missing:7b" in caught.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_o5_busy(client: openai.OpenAI, fake: FakeOllama, stream: bool) -> None:
    fake.script(MODEL, status=503, error=BUSY_MESSAGE)
    with pytest.raises(openai.InternalServerError) as caught:  # no retry: the mapping itself is under test
        client.chat.completions.create(model=MODEL, messages=USER, stream=stream,
                                       extra_headers={"X-Appliance-No-Retry": "true"})
    error = caught.value
    assert error.status_code == 503
    assert error.body["code"] == "backend_overloaded" and error.body["type"] == "server_error"
    retry_after = error.response.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 120
    assert int(error.response.headers["retry-after-ms"]) >= 1000


def test_o5_mid_stream_error(client: openai.OpenAI, gateway: Appliance, fake: FakeOllama) -> None:
    fake.script(MODEL, content_pieces=["Hel", "lo"], mid_stream_error="boom")
    with pytest.raises(openai.APIError, match="boom"):
        for _ in client.chat.completions.create(model=MODEL, messages=USER, stream=True):
            pass

    fake.script(MODEL, content_pieces=["Hel", "lo"], mid_stream_error="boom")
    response = post_raw(gateway, "/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True})
    assert response.status_code == 200
    data = sse_data(response.text)
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "Hel"
    error = json.loads(data[-2])["error"]
    assert error["message"] == "boom" and error["code"] == "backend_error"
    assert data[-1] == "[DONE]"

    deadline = time.monotonic() + 5
    while "failed mid-stream: boom" not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "failed mid-stream: boom" in gateway.log()


def test_o5_missing_capability(client: openai.OpenAI, fake: FakeOllama) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support tools") as caught:
        client.chat.completions.create(model="llava", messages=USER, tools=[WEATHER_TOOL])
    assert caught.value.body["type"] == "invalid_request_error"
    fake.script(MODEL, status=400, error='"llama3.2:latest" does not support thinking')
    with pytest.raises(openai.BadRequestError, match="does not support thinking"):
        client.chat.completions.create(model=MODEL, messages=USER)


# ------------------------------------------------------------------------------------------ O6 embeddings, models


def _unpack(data: str) -> list[float]:
    raw = base64.b64decode(data)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_o6_embeddings(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script("all-minilm", prompt_eval_count=4)
    reply = client.embeddings.create(model="all-minilm", input=["a", "b"], encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1]
    assert reply.usage.prompt_tokens == 4 and reply.usage.total_tokens == 4
    vectors = [d.embedding for d in reply.data]
    assert all(len(v) == 384 and math.isclose(math.hypot(*v), 1.0, rel_tol=1e-6) for v in vectors)
    assert fake.last("/api/embed") == {"model": "all-minilm:latest", "input": ["a", "b"]}

    packed = client.embeddings.create(model="all-minilm", input=["a", "b"], encoding_format="base64")
    for plain, encoded in zip(vectors, packed.data, strict=True):
        assert isinstance(encoded.embedding, str)
        assert _unpack(encoded.embedding) == list(struct.unpack(f"<{len(plain)}f", struct.pack(f"<{len(plain)}f",
                                                                                               *plain)))
    default = client.embeddings.create(model="all-minilm", input="a")  # the SDK asks for base64 itself
    assert default.data[0].embedding == pytest.approx(vectors[0], rel=1e-6)


def test_o6_embeddings_refuse_token_arrays(client: openai.OpenAI, fake: FakeOllama) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="all-minilm", input=[[1, 2, 3]])
    assert caught.value.body["param"] == "input"
    assert fake.seen("/api/embed") == []


def test_o6_models_enrichment(client: openai.OpenAI) -> None:
    entry = poll_model(client, MODEL, lambda e: e["context_window"] == 8192 and not e["backends"][0]["loaded"])
    assert entry["owned_by"] == "ollama"
    assert entry["context_window_trained"] == 8192
    assert entry["capabilities"]["tools"] is True
    assert entry["capabilities"]["embeddings"] is False
    assert entry["capabilities"]["chat"] is True and entry["capabilities"]["vision"] is False
    assert entry["backends"] == [{"id": "ollama", "kind": "ollama", "state": "ready", "loaded": False}]
    minilm = poll_model(client, "all-minilm:latest", lambda e: True)
    assert minilm["capabilities"]["embeddings"] is True and minilm["capabilities"]["chat"] is False
    assert poll_model(client, "llava:latest", lambda e: True)["capabilities"]["vision"] is True


def test_o6_loaded_model_reports_its_runtime_window(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.load(MODEL, context_length=2048)
    entry = poll_model(client, MODEL, lambda e: e["context_window"] == 2048)
    assert entry["context_window_trained"] == 8192
    assert entry["backends"][0]["loaded"] is True
