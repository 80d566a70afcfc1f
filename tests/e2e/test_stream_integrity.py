"""A backend whose stream is not server-sent events of JSON: what the client gets, the ledger, the breaker.

One appliance (2 workers) for the module; each test forces its own backend name (all point at the fake
upstream), so one test's failures never open another test's breaker.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.ledger import logged

pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
HELLO = [{"role": "user", "content": "Hi"}]
BACKENDS = ("late", "sdk", "early", "messages", "breaker")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any) -> Iterator[Appliance]:
    backends = [{"name": name, "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]}
                for name in BACKENDS]
    config = {"discovery": {"enabled": False, "interval_s": 300}, "backends": backends,
              "routing": {"retries": 0, "breaker_failures": 3, "breaker_cooldown_s": 300, "probe_interval_s": 300}}
    app = Appliance(tmp_path_factory.mktemp("stream-integrity"), config)
    app.start()
    yield app
    app.stop()


def stream(app: Appliance, model: str, path: str = "/v1/chat/completions",
           **fields: Any) -> tuple[httpx.Response, bytes, str]:
    """(response, raw body, request id) of a streamed request."""
    request_id = str(uuid.uuid4())
    body = {"model": model, "messages": HELLO, "stream": True, **fields}
    with httpx.stream("POST", app.url + path, json=body, headers={**AUTH, "X-Request-ID": request_id},
                      timeout=30) as response:
        raw = response.read()
    return response, raw, request_id


def test_garbage_after_the_first_chunks_ends_the_stream_with_an_error_event(app: Appliance) -> None:
    response, raw, request_id = stream(app, "late/fake-garbage-late")
    assert response.status_code == 200
    text = raw.decode()  # strict UTF-8: none of the garbage reached the client
    assert "\x00" not in text and "not an event" not in text
    events = [event for event in text.split("\n\n") if event]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["code"], error["type"], error["request_id"]) == ("backend_error", "server_error", request_id)
    deltas = [json.loads(event.removeprefix("data: "))["choices"][0]["delta"] for event in events[:-2]]
    assert "".join(delta.get("content") or "" for delta in deltas) == "Hello from the fake."  # what came first
    assert '"finish_reason": "stop"' not in text  # nothing after the garbage
    row = logged(app, request_id)
    assert (row["status"], row["error_code"], row["backend"]) == (200, "backend_error", "late")


def test_the_sdk_raises_an_api_error_not_a_decode_error(app: Appliance) -> None:
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    chunks = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="sdk/fake-garbage-late", messages=HELLO, stream=True):
            chunks.append(chunk)
    assert "not server-sent events of JSON" in info.value.message
    assert chunks and chunks[0].choices[0].delta.role == "assistant"


def test_garbage_from_the_first_byte_is_a_502_before_any_stream(app: Appliance) -> None:
    response, raw, request_id = stream(app, "early/fake-garbage")
    assert response.status_code == 502
    assert json.loads(raw)["error"]["code"] == "backend_error"
    row = logged(app, request_id)
    assert (row["status"], row["error_code"]) == (502, "backend_error")


def test_a_translated_messages_stream_ends_with_its_own_error_event(app: Appliance) -> None:
    response, raw, request_id = stream(app, "messages/fake-garbage-late", "/v1/messages", max_tokens=32)
    assert response.status_code == 200
    text = raw.decode()
    assert "not an event" not in text
    last = [event for event in text.split("\n\n") if event][-1]
    assert last.startswith("event: error\n")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "api_error"
    assert logged(app, request_id)["error_code"] == "backend_error"


def test_garbled_streams_count_against_the_backends_breaker(app: Appliance) -> None:
    for _ in range(3):  # breaker_failures = 3; each answered 200, with an error event at the end
        response, raw, _ = stream(app, "breaker/fake-garbage-late")
        assert response.status_code == 200 and b'"backend_error"' in raw
    states = {httpx.get(app.url + "/ready").json()["backends"]["breaker"]["breaker"]["state"] for _ in range(4)}
    assert states == {"open"}  # fresh connections: both workers see it
    refused = httpx.post(app.url + "/v1/chat/completions", json={"model": "breaker/fake-chat", "messages": HELLO},
                         headers=AUTH, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_healthy_backend"
