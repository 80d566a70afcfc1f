"""The OpenAI surface through the official SDK, against the scriptable fake upstream (2 workers)."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import REPLY_TEXT, STREAM_PIECES, USAGE
from tests.support.appliance import ADMIN_KEY

# The frozen subset runs this module again against the built binary (tests/run).
pytestmark = pytest.mark.frozen


def test_chat_non_stream(client, fake_openai):
    raw = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=[{"role": "user", "content": "Hi"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY_TEXT
    assert completion.usage.prompt_tokens == USAGE["prompt_tokens"]
    assert raw.headers["x-appliance-backend"] == "fake"
    assert raw.headers["x-appliance-model"] == "fake-chat"
    assert float(raw.headers["x-appliance-latency-ms"]) > 0
    assert 0 <= float(raw.headers["x-appliance-overhead-ms"]) <= float(raw.headers["x-appliance-latency-ms"])
    assert raw.headers["x-fake-upstream"] == "yes"  # the backend's own headers pass through
    seen = fake_openai.find(raw.headers["x-request-id"])
    assert seen.body["model"] == "fake-chat"


def test_request_ids_echoed_and_uuid_shaped_upstream(gateway, fake_openai):
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "Hi"}]}
    client_uuid = "0D4C5C1E-7A43-4C39-9B7B-1B0F4A3E5C11"
    status, _, headers = gateway.post("/v1/chat/completions", body, headers={"X-Request-ID": client_uuid})
    assert status == 200 and headers["X-Request-ID"] == client_uuid  # as sent, case included
    assert fake_openai.find(client_uuid).body["model"] == "fake-chat"
    status, _, headers = gateway.post("/v1/chat/completions", body, headers={"X-Request-ID": "my-id-42"})
    assert status == 200 and headers["X-Request-ID"] == "my-id-42"
    # llama-cpp-python answers 400 to a non-UUID X-Request-ID, so the backend gets a UUID-shaped id of ours
    upstream_id = fake_openai.requests[-1].headers["X-Request-ID"]
    assert uuid.UUID(upstream_id) and upstream_id != "my-id-42"
    generated = gateway.post("/v1/chat/completions", body)[2]["X-Request-ID"]
    assert uuid.UUID(generated)


def test_unknown_fields_reach_the_backend_and_gateway_fields_do_not(client, fake_openai):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Weather?"}], tools=tools, tool_choice="auto",
        response_format={"type": "json_object"}, seed=7, logprobs=True, temperature=0,
        extra_body={"fallbacks": ["x"], "fallback": ["y"], "provider": "fake", "timeout": 5000, "retries": 1,
                    "vendor_specific": {"top_k": 3}})
    body = fake_openai.find(raw.headers["x-request-id"]).body
    assert body["model"] == "fake-chat"  # the alias resolved, the name rewritten
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"}
    assert body["seed"] == 7 and body["logprobs"] is True and body["temperature"] == 0
    assert body["vendor_specific"] == {"top_k": 3}
    assert not {"fallbacks", "fallback", "provider", "timeout", "retries"} & body.keys()


def test_upstream_gets_the_backend_key_never_the_clients(client, fake_openai):
    raw = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=[{"role": "user", "content": "Hi"}], extra_headers={"Cookie": "a=b"})
    headers = {k.lower(): v for k, v in fake_openai.find(raw.headers["x-request-id"]).headers.items()}
    assert headers["authorization"] == "Bearer sk-backend-secret"
    assert ADMIN_KEY not in json.dumps(headers)
    assert "cookie" not in headers and "x-api-key" not in headers


def test_tool_calls_pass_through(client):
    completion = client.chat.completions.create(
        model="fake-tools", messages=[{"role": "user", "content": "Weather in Tokyo?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Tokyo"}


def test_stream_without_usage_request_hides_the_usage_chunk(client, fake_openai):
    stream = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=[{"role": "user", "content": "Hi"}], stream=True)
    chunks = list(stream.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(STREAM_PIECES)
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    seen = fake_openai.find(stream.headers["x-request-id"])
    assert seen.body["stream_options"] == {"include_usage": True}  # asked for accounting anyway


def test_stream_with_usage_request_keeps_it(client):
    chunks = list(client.chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == USAGE["total_tokens"]


def test_stream_of_tool_call_fragments(client):
    stream = client.chat.completions.create(
        model="fake-tools", messages=[{"role": "user", "content": "Weather?"}], stream=True)
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                   for c in stream if c.choices and c.choices[0].delta.tool_calls)
    assert json.loads(args) == {"city": "Tokyo"}


def test_raw_stream_framing_and_headers(gateway):
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={"model": "fake-chat", "stream": True, "messages": [{"role": "user", "content": "x"}]},
                      timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-appliance-backend"] == "fake"
        assert float(response.headers["x-appliance-overhead-ms"]) >= 0
        text = response.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert text.count("data: [DONE]") == 1
    assert all(e.startswith("data: ") for e in events)


def test_completions_stream_and_not(client):
    completion = client.completions.create(model="fake-chat", prompt="Say hi")
    assert completion.choices[0].text == REPLY_TEXT
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="fake-chat", prompt="Say hi", stream=True) if c.choices)
    assert text == "".join(STREAM_PIECES)


def test_embeddings(client):
    result = client.embeddings.create(model="fake-embed", input=["a", "b"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == 6


def test_embeddings_on_a_backend_without_them_is_501(client):
    """The client picked a model that cannot embed: 501 `unsupported` naming the model, never retried."""
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model="fake-404-bare", input="a")
    assert caught.value.body["code"] == "unsupported" and caught.value.body["param"] == "model"
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert len(ids) == len(set(ids))
    assert {"fake-chat", "fake-embed", "org/fake-slash", "chat", "tiny-chat"} <= set(ids)
    assert not any(i.startswith("fake/") for i in ids)  # backend/model is accepted, not listed
    fake_chat = next(m for m in models if m.id == "fake-chat")
    assert fake_chat.owned_by == "fake"
    assert fake_chat.model_extra["backends"][0]["id"] == "fake"
    assert set(fake_chat.model_extra["capabilities"]) == {"chat", "completions", "embeddings", "tools", "vision",
                                                         "reasoning"}
    alias = next(m for m in models if m.id == "chat")
    assert alias.owned_by == "appliance" and alias.model_extra["target"] == "fake/fake-chat"
    assert client.models.retrieve("org/fake-slash").id == "org/fake-slash"
    assert client.models.retrieve("chat").id == "chat"


def test_slash_model_ids_and_forced_backends(client):
    assert client.chat.completions.create(
        model="org/fake-slash", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == REPLY_TEXT
    raw = client.chat.completions.with_raw_response.create(
        model="fake/unlisted-model", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-appliance-model"] == "unlisted-model"


def test_request_log_rows_hold_no_prompt_text(gateway, client):
    secret = "the-prompt-must-not-be-stored-9f2c"
    raw = client.chat.completions.with_raw_response.create(
        model="fake-chat", messages=[{"role": "user", "content": secret}])
    request_id = raw.headers["x-request-id"]
    import sqlite3
    import time

    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline and row is None:
        conn = sqlite3.connect(gateway.data_dir / "appliance.db")
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        conn.close()
        time.sleep(0.05)
    assert row is not None
    assert (row["model"], row["backend"], row["status"], row["prompt_tokens"]) == ("fake-chat", "fake", 200, 11)
    assert row["estimated"] == 0 and row["latency_ms"] > 0
    dump = (gateway.data_dir / "appliance.db").read_bytes() + (gateway.data_dir / "appliance.db-wal").read_bytes()
    assert secret.encode() not in dump


def test_status_page_and_its_files(gateway):
    status, html, headers = gateway.get("/")
    assert status == 200 and "text/html" in headers["Content-Type"]
    assert '<script src="/static/app.js">' in html
    assert gateway.get("/status")[0] == 200
    for name in ("app.js", "style.css"):
        assert gateway.get(f"/static/{name}")[0] == 200
