"""Every failure a client can meet: the OpenAI envelope, the true status, a request id, the field at fault."""

from __future__ import annotations

import socket
import time
import uuid

import httpx
import openai
import pytest

from tests.support.appliance import ADMIN_KEY

# The frozen subset runs this module again against the built binary (tests/run).
pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
HELLO = [{"role": "user", "content": "Hi"}]


def error_of(call):
    try:
        call()
    except openai.APIStatusError as exc:
        assert set(exc.body) >= {"message", "type", "param", "code"}, exc.body
        assert exc.response.headers.get("x-request-id")
        return exc
    raise AssertionError("expected an error")


def test_unknown_model_is_404_listing_known_ids(client):
    exc = error_of(lambda: client.chat.completions.create(model="gpt-99", messages=HELLO))
    assert isinstance(exc, openai.NotFoundError)
    assert (exc.body["code"], exc.body["param"], exc.body["type"]) == ("model_not_found", "model",
                                                                      "invalid_request_error")
    assert "fake-chat" in exc.body["message"]


@pytest.mark.parametrize(("body", "code", "param"), [
    (b'{"model": "fake-chat", "messages": [', "invalid_json", None),
    (b"", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_field", "model"),
    (b'{"model": "fake-chat"}', "missing_field", "messages"),
    (b'{"model": "fake-chat", "messages": "hi"}', "invalid_value", "messages"),
    (b'{"model": "fake-chat", "messages": [{"content": "x"}]}', "invalid_value", "messages.[0].role"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "invalid_value", "model"),
    (b'{"model": "fake-chat", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
     "invalid_value", "stream"),
])
def test_bad_chat_bodies_are_400_naming_the_field(gateway, body, code, param):
    status, data, headers = gateway.post("/v1/chat/completions", body)
    assert status == 400
    assert data["error"]["code"] == code and data["error"]["param"] == param
    assert data["error"]["type"] == "invalid_request_error"
    assert data["error"]["request_id"] == headers["X-Request-ID"]


def test_missing_prompt_and_input(gateway):
    assert gateway.post("/v1/completions", {"model": "fake-chat"})[1]["error"]["param"] == "prompt"
    assert gateway.post("/v1/embeddings", {"model": "fake-embed"})[1]["error"]["param"] == "input"


def test_unknown_path_and_method(gateway):
    status, data, _ = gateway.get("/v1/nothing-here")
    assert status == 404 and data["error"]["code"] == "not_found"
    status, data, headers = gateway.get("/v1/chat/completions")
    assert status == 405 and data["error"]["type"] == "invalid_request_error"
    assert "POST" in headers["Allow"]


def test_backend_down_is_502(client):
    exc = error_of(lambda: client.chat.completions.create(model="down-model", messages=HELLO))
    assert exc.status_code == 502 and exc.body["code"] == "backend_unreachable"
    assert exc.response.headers["x-appliance-backend"] == "down"


def test_backend_timeout_is_504(client):
    started = time.monotonic()
    exc = error_of(lambda: client.chat.completions.create(model="impatient/fake-hang", messages=HELLO))
    assert exc.status_code == 504 and exc.body["code"] == "backend_timeout"
    assert time.monotonic() - started < 10


def test_upstream_envelope_passes_through_with_its_status(client):
    exc = error_of(lambda: client.chat.completions.create(model="faulty/fake-500", messages=HELLO))
    assert exc.status_code == 500
    assert exc.body["message"] == "the fake broke" and exc.body["code"] == "fake_failure"
    exc = error_of(lambda: client.chat.completions.create(model="faulty/fake-400", messages=HELLO))
    assert isinstance(exc, openai.BadRequestError)
    assert exc.body["param"] == "temperature"


def test_upstream_non_envelopes_are_wrapped(client):
    exc = error_of(lambda: client.chat.completions.create(model="faulty/fake-500-text", messages=HELLO))
    assert exc.status_code == 500
    assert exc.body["message"] == "upstream exploded" and exc.body["type"] == "server_error"
    exc = error_of(lambda: client.chat.completions.create(model="faulty/fake-vllm-error", messages=HELLO))
    assert exc.status_code == 400 and exc.body["code"] == "backend_error" and exc.body["message"] == "bad things"


def test_errors_before_the_first_byte_of_a_stream_keep_their_status(client):
    exc = error_of(lambda: list(client.chat.completions.create(model="faulty/fake-500", messages=HELLO, stream=True)))
    assert exc.status_code == 500


def test_mid_stream_reset_ends_with_an_error_event_then_done(gateway):
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=AUTH, timeout=10,
                      json={"model": "faulty/fake-reset", "stream": True, "messages": HELLO}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert '"content": "Hello"' in text
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error"')
    assert '"code":"backend_unreachable"' in events[-2]


def test_mid_stream_reset_through_the_sdk_raises(client):
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="faulty/fake-reset", messages=HELLO, stream=True))


def test_client_disconnect_cancels_the_upstream_request(gateway, fake_openai):
    request_id = str(uuid.uuid4())
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=10,
                      headers={**AUTH, "X-Request-ID": request_id},
                      json={"model": "fake-long", "stream": True, "messages": HELLO}) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any("w1" in line for line in received)
    closed_at = time.time()
    seen = fake_openai.find(request_id)
    deadline = time.monotonic() + 5
    while seen.cancelled_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.cancelled_at is not None, "the backend kept generating for nobody"
    assert seen.cancelled_at - closed_at < 2
    assert seen.finished_at is None


def test_client_disconnect_on_a_non_stream_request_cancels_it_too(gateway, fake_openai):
    request_id = str(uuid.uuid4())
    body = b'{"model": "fake-hang", "messages": [{"role": "user", "content": "x"}]}'
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {ADMIN_KEY}\r\nX-Request-ID: {request_id}\r\n".encode()
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fake_openai.find(request_id)
                break
            except LookupError:
                time.sleep(0.02)
    # The socket is closed: the fake's handler must be cancelled, not left hanging for an hour.
    seen = fake_openai.find(request_id)
    deadline = time.monotonic() + 5
    while seen.cancelled_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.cancelled_at is not None


def test_body_too_large_is_413(start_appliance, fake_openai):
    app = start_appliance({"server": {"max_body_mb": 0.01}, "discovery": {"enabled": False},
                           "backends": [{"name": "fake", "url": fake_openai.url + "/v1"}]}, workers=1)
    big = {"model": "fake-chat", "messages": [{"role": "user", "content": "x" * 20_000}]}
    status, data, headers = app.post("/v1/chat/completions", big)
    assert status == 413
    assert data["error"]["code"] == "body_too_large"
    assert headers["X-Request-ID"]
    assert app.post("/v1/chat/completions", {"model": "fake-chat", "messages": HELLO})[0] == 200


@pytest.mark.parametrize(("query", "param"), [
    ("/admin/usage?to=", "to"),  # found by the fuzzer: a blank value was taken for "no bound", 200
    ("/admin/usage?from=", "from"),
    ("/admin/usage?group_by=", "group_by"),
    ("/admin/requests?limit=", "limit"),
    ("/v1/files?limit=", "limit"),
    ("/v1/files?order=", "order"),
    ("/v1/batches?limit=", "limit"),
])
def test_a_blank_query_value_is_refused_by_name(gateway, query, param):
    response = httpx.get(gateway.url + query, headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
