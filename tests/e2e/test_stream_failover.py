"""Mid-stream failover: a stream whose backend fails after its first token goes on on the route's next target.

The failing targets are scripted on the OpenAI fake (tests/fakes/chat_scripts.py, models ``script-<name>`` on the
backend "flaky"): "reset" drops the connection after "He", "llo"; "error-event" sends an error event there;
"stall" goes silent there; "reset-in-call" drops it inside a tool call. The next target is the fake's normal
answer ("Hello", " from", " the fake.", usage 11 + 5). Each test marks its request with a unique user message
to find what the fake saw.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import websockets.sync.client

from tests.conftest import base_config
from tests.fakes.anthropic_upstream import API_KEY as ANTHROPIC_KEY
from tests.fakes.anthropic_upstream import TEXT_MODEL, FakeAnthropic
from tests.fakes.openai_upstream import REPLY_TEXT, USAGE, FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.openapi import validate_event
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen  # also run against the one-file binary (tests/run)

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PREFIX = "Hello"  # what the failing scripts stream before they fail: "He", "llo"
FROM_RESET = {"from": "flaky/script-reset", "to": "fake/fake-chat", "at_token": 2}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI, fake_ollama: Any,
        fake_anthropic: FakeAnthropic, llamacpp_port: int) -> Iterator[Appliance]:
    config = base_config(fake_openai, fake_ollama, llamacpp_port)
    config["backends"].append({"name": "claude", "type": "anthropic", "url": fake_anthropic.url + "/v1",
                               "api_key": ANTHROPIC_KEY, "discover": False, "models": [TEXT_MODEL]})
    # Failing on purpose many times: no breaker may close the failing target (its failover is what is tested).
    config["routing"] = {"breaker_failures": 1000, "breaker_min_requests": 1000, "retries": 0}
    config["backends"].append({"name": "flaky", "url": fake_openai.url + "/v1", "discover": False,
                               "models": ["script-reset", "script-error-event", "script-stall",
                                          "script-reset-in-call"]})
    config["models"] += [
        {"name": "fo-reset", "targets": ["flaky/script-reset", "fake/fake-chat"]},
        {"name": "fo-error", "targets": ["flaky/script-error-event", "fake/fake-chat"]},
        {"name": "fo-stall", "targets": ["flaky/script-stall", "fake/fake-chat"], "stream_stall_ms": 300},
        {"name": "fo-in-call", "targets": ["flaky/script-reset-in-call", "fake/fake-chat"]},
        {"name": "fo-nowhere", "targets": ["flaky/script-reset", "down/down-model"]},
        {"name": "fo-claude", "targets": ["flaky/script-reset", f"claude/{TEXT_MODEL}"]},
        {"name": "fo-llamacpp", "targets": ["flaky/script-reset", "llamacpp/tiny"]},
    ]
    app = Appliance(tmp_path_factory.mktemp("failover"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)


def marked() -> tuple[str, list[dict[str, str]]]:
    marker = f"failover test {uuid.uuid4()}"
    return marker, [{"role": "user", "content": marker}]


def seen_bodies(fake: FakeOpenAI, marker: str) -> list[dict[str, Any]]:
    """The chat bodies the fake got for one marked request, in order."""
    return [seen.body for seen in fake.chats() if isinstance(seen.body, dict)
            and (seen.body.get("messages") or [{}])[0].get("content") == marker]


def logged(app: Appliance, request_id: str) -> dict[str, Any]:
    def row() -> dict[str, Any]:
        status, body, _ = app.get("/admin/requests?limit=200")
        assert status == 200
        found = [r for r in body["data"] if r["request_id"] == request_id]
        assert found, "not logged yet"
        return found[0]

    return eventually(row)


def raw_stream(app: Appliance, path: str, body: dict[str, Any]) -> str:
    headers = {**AUTH, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", app.url + path, json={**body, "stream": True}, headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return r.read().decode()


def frames(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name or None, data) of each SSE frame but [DONE]."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "".join(line[6:] for line in lines if line.startswith("data: "))
        if data and data != "[DONE]":
            out.append((name, json.loads(data)))
    return out


# ------------------------------------------------------------------------------------------ chat


def test_a_reset_stream_goes_on_on_the_next_target_as_one_stream(app: Appliance, client: openai.OpenAI,
                                                                   fake_openai: FakeOpenAI) -> None:
    marker, messages = marked()
    raw = client.chat.completions.with_raw_response.create(model="fo-reset", messages=messages, stream=True,
                                                          stream_options={"include_usage": True})
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PREFIX + REPLY_TEXT
    # One stream as the client sees it: the first stream's id, created and model throughout.
    assert {(c.id, c.created, c.model) for c in chunks} == {("chatcmpl-script", 1700000000, "script-reset")}
    last = chunks[-1]
    assert last.model_extra["appliance"] == {"failover": FROM_RESET}
    # Both attempts counted: the failed one's prompt (estimated) and its two tokens, then the fake's own.
    assert last.usage.completion_tokens == USAGE["completion_tokens"] + 2
    assert last.usage.prompt_tokens > USAGE["prompt_tokens"]
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens

    first, second = seen_bodies(fake_openai, marker)
    assert first["model"] == "script-reset" and second["model"] == "fake-chat"
    assert second["messages"] == [*messages, {"role": "assistant", "content": PREFIX}]
    assert second["stream"] is True

    row = logged(app, raw.headers["x-request-id"])
    assert row["failover"] == FROM_RESET
    assert row["status"] == 200 and row["error_code"] is None and row["backend"] == "fake"
    assert row["completion_tokens"] == USAGE["completion_tokens"] + 2

    metrics = httpx.get(app.url + "/metrics", timeout=10).text
    assert 'appliance_stream_failovers_total{from_backend="flaky",to_backend="fake"}' in metrics


def test_the_failed_backend_counts_a_failure_and_neither_backend_keeps_the_request_in_flight(
        app: Appliance, client: openai.OpenAI) -> None:
    def breakers() -> dict[str, Any]:
        backends = httpx.get(app.url + "/ready", timeout=10).json()["backends"]
        return {name: backends[name]["breaker"] for name in ("flaky", "fake")}

    before = breakers()["flaky"]["window_fail"]
    list(client.chat.completions.create(model="fo-reset", messages=marked()[1], stream=True))

    def settled() -> None:
        now = breakers()
        assert now["flaky"]["window_fail"] == before + 1
        assert now["flaky"]["in_flight"] == 0 and now["fake"]["in_flight"] == 0

    eventually(settled)


def test_without_usage_asked_the_finish_chunk_carries_the_failover(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fo-reset", messages=marked()[1], stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["appliance"] == {"failover": FROM_RESET}


def test_an_error_event_mid_stream_goes_on(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fo-error", messages=marked()[1], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PREFIX + REPLY_TEXT
    assert chunks[-1].model_extra["appliance"]["failover"]["from"] == "flaky/script-error-event"


def test_a_stalled_stream_goes_on_after_stream_stall_ms(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fo-stall", messages=marked()[1], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PREFIX + REPLY_TEXT
    assert chunks[-1].model_extra["appliance"]["failover"] == {**FROM_RESET, "from": "flaky/script-stall"}


def test_an_anthropic_backend_continues_the_prefix_as_a_prefill(client: openai.OpenAI,
                                                                fake_anthropic: FakeAnthropic) -> None:
    marker, messages = marked()
    chunks = list(client.chat.completions.create(model="fo-claude", messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(PREFIX) and len(text) > len(PREFIX)
    assert {c.id for c in chunks} == {"chatcmpl-script"}
    assert chunks[-1].model_extra["appliance"]["failover"]["to"] == f"claude/{TEXT_MODEL}"
    sent = fake_anthropic.last().body
    assert sent["messages"][0]["content"] in (marker, [{"type": "text", "text": marker}])
    last = sent["messages"][-1]
    assert last["role"] == "assistant" and last["content"] in (PREFIX, [{"type": "text", "text": PREFIX}])


@pytest.mark.llamacpp
def test_the_real_llamacpp_server_continues_a_failed_stream(client: openai.OpenAI, llamacpp_url: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model="fo-llamacpp", messages=marked()[1], stream=True,
                                                          max_tokens=8, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(PREFIX)  # then the tiny model's gibberish
    assert {c.id for c in chunks} == {"chatcmpl-script"}
    assert chunks[-1].model_extra["appliance"]["failover"] == {**FROM_RESET, "to": "llamacpp/tiny"}
    assert chunks[-1].usage.completion_tokens > 2


# ------------------------------------------------------------------------------------------ the old error event


def old_error_event(app: Appliance, body: dict[str, Any]) -> str:
    text = raw_stream(app, "/v1/chat/completions", body)
    assert text.startswith("data: ") and '"error"' in text and text.endswith("data: [DONE]\n\n"), text
    assert '"appliance"' not in text
    return text


def test_n_above_1_gets_the_old_error_event(app: Appliance, fake_openai: FakeOpenAI) -> None:
    marker, messages = marked()
    old_error_event(app, {"model": "fo-reset", "messages": messages, "n": 2})
    assert len(seen_bodies(fake_openai, marker)) == 1


def test_a_stream_cut_inside_a_tool_call_gets_the_old_error_event(app: Appliance, fake_openai: FakeOpenAI) -> None:
    marker, messages = marked()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = old_error_event(app, {"model": "fo-in-call", "messages": messages, "tools": tools})
    assert '"tool_calls"' in text
    assert len(seen_bodies(fake_openai, marker)) == 1


def test_with_no_second_target_the_old_error_event(app: Appliance, fake_openai: FakeOpenAI) -> None:
    marker, messages = marked()
    old_error_event(app, {"model": "flaky/script-reset", "messages": messages})
    assert len(seen_bodies(fake_openai, marker)) == 1


def test_with_the_next_target_down_the_old_error_event(app: Appliance) -> None:
    old_error_event(app, {"model": "fo-nowhere", "messages": marked()[1]})


def test_with_the_switch_off_the_old_error_event(start_appliance: Any, fake_openai: FakeOpenAI) -> None:
    config = {"backends": [{"name": "flaky", "url": fake_openai.url + "/v1", "discover": False,
                            "models": ["script-reset"]},
                           {"name": "fake", "url": fake_openai.url + "/v1", "discover": False,
                            "models": ["fake-chat"]}],
              "routing": {"stream_failover": False},
              "models": [{"name": "fo-reset", "targets": ["flaky/script-reset", "fake/fake-chat"]}]}
    app = start_appliance(config)
    app.wait_ready()
    marker, messages = marked()
    old_error_event(app, {"model": "fo-reset", "messages": messages})
    assert len(seen_bodies(fake_openai, marker)) == 1


# ------------------------------------------------------------------------------------------ Messages, Responses


def test_messages_stream_goes_on_under_one_message(app: Appliance) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0, timeout=30)
    with claude.messages.stream(model="fo-reset", max_tokens=64, messages=marked()[1]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == PREFIX + REPLY_TEXT
    assert final.usage.output_tokens == USAGE["completion_tokens"] + 2

    seen = frames(raw_stream(app, "/v1/messages", {"model": "fo-reset", "max_tokens": 64,
                                                   "messages": marked()[1]}))
    names = [name for name, _ in seen]
    assert names.count("message_start") == 1 and names[-1] == "message_stop"
    (delta,) = [data for name, data in seen if name == "message_delta"]
    assert delta["appliance"] == {"failover": FROM_RESET}


def responses_checked(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The events of one streamed response: numbered without a gap, one response id; its completed event."""
    assert [e["sequence_number"] for e in events] == list(range(events[0]["sequence_number"],
                                                                events[0]["sequence_number"] + len(events)))
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1
    assert len({e["item_id"] for e in events if "item_id" in e}) == 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == PREFIX + REPLY_TEXT
    completed = events[-1]
    assert completed["type"] == "response.completed"
    return completed["response"]


def test_responses_stream_goes_on_with_its_ids_and_sequence_numbers(app: Appliance) -> None:
    events = [data for _, data in frames(raw_stream(app, "/v1/responses", {"model": "fo-reset",
                                                                          "input": marked()[0]}))]
    for event in events:
        validate_event(event)
    response = responses_checked(events)
    assert response["appliance"] == {"failover": FROM_RESET}
    assert response["usage"]["output_tokens"] == USAGE["completion_tokens"] + 2


def test_responses_websocket_goes_on(app: Appliance) -> None:
    url = app.url.replace("http://", "ws://") + "/v1/responses"
    with websockets.sync.client.connect(url, additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "fo-reset", "input": marked()[0], "store": False}))
        events = []
        while not events or events[-1]["type"] not in ("response.completed", "response.failed", "error"):
            events.append(json.loads(ws.recv(timeout=30)))
    assert responses_checked(events)["appliance"] == {"failover": FROM_RESET}
