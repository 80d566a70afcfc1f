"""The Responses surface, driven by the official openai SDK, over chat-completions backends, 2 workers."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import websockets.exceptions
import websockets.sync.client

from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.ledger import logged, rows_where
from tests.support.openapi import validate

pytestmark = pytest.mark.frozen

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sdk(gateway: Appliance) -> openai.OpenAI:
    """A client with its own connection pool: successive clients tend to land on different workers."""
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60,
                         http_client=httpx.Client(timeout=60))


def test_create_text(gateway: Appliance) -> None:
    response = sdk(gateway).responses.create(model="fake/fake-chat", input="Say hello.", instructions="Be brief.")
    assert response.status == "completed" and response.output_text == "Hello from the fake."
    assert response.usage.input_tokens == 11 and response.usage.output_tokens == 5
    validate(response.model_dump(mode="json", exclude_unset=True), "Response")


def test_function_call_then_follow_up_on_another_worker(gateway: Appliance, fake_openai) -> None:
    first = sdk(gateway).responses.create(model="fake/fake-tools", input="Weather in Tokyo?", tools=[WEATHER])
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and call.arguments == '{"city": "Tokyo"}'
    follow = sdk(gateway).responses.create(
        model="fake/fake-chat", previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert follow.status == "completed" and follow.previous_response_id == first.id
    sent = fake_openai.requests[-1].body["messages"]
    assert sent[0] == {"role": "user", "content": "Weather in Tokyo?"}
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[2]["role"] == "tool" and sent[2]["content"] == "sunny, 21 C"


def test_stream_accumulated_by_the_sdk(gateway: Appliance) -> None:
    with sdk(gateway).responses.stream(model="fake/fake-chat", input="Say hello.") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final.output_text == "Hello from the fake."
    stored = sdk(gateway).responses.retrieve(final.id)  # stored before the final event went out
    assert stored.output_text == final.output_text


def test_retrieve_input_items_delete(gateway: Appliance) -> None:
    client = sdk(gateway)
    created = client.responses.create(model="fake/fake-chat", input=[
        {"role": "user", "content": "one"}, {"role": "user", "content": "two"}])
    assert sdk(gateway).responses.retrieve(created.id).id == created.id
    items = sdk(gateway).responses.input_items.list(created.id, order="asc")
    assert [item.content[0].text for item in items.data] == ["one", "two"]
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk(gateway).responses.retrieve(created.id)


def test_unknown_previous_response_and_store_false(gateway: Appliance) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gateway).responses.create(model="fake/fake-chat", input="hi", previous_response_id="resp_nope")
    assert info.value.code == "previous_response_not_found" and info.value.param == "previous_response_id"
    unstored = sdk(gateway).responses.create(model="fake/fake-chat", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk(gateway).responses.retrieve(unstored.id)


@pytest.mark.llamacpp
def test_real_server_through_responses(gateway: Appliance, llamacpp_url: str) -> None:
    response = sdk(gateway).responses.create(model="tiny-chat", input="Say hello.", max_output_tokens=16)
    assert response.status in ("completed", "incomplete") and response.usage.output_tokens > 0


# ------------------------------------------------------------------------------------------ WebSocket mode


def ws_url(gateway: Appliance) -> str:
    return gateway.url.replace("http://", "ws://") + "/v1/responses"


def events_until_done(ws: websockets.sync.client.ClientConnection) -> list[dict]:
    events = []
    while True:
        event = json.loads(ws.recv(timeout=30))
        events.append(event)
        if event["type"] in ("response.completed", "response.failed", "response.incomplete", "error"):
            return events


def test_websocket_turns_continuation_and_errors_keep_the_socket(gateway: Appliance, fake_openai) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Appliance-Session-ID": "sess-42"}
    with websockets.sync.client.connect(ws_url(gateway), additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "fake/fake-chat", "input": "Say hello.",
                            "store": False}))
        first = events_until_done(ws)
        assert first[0]["type"] == "response.created" and first[-1]["type"] == "response.completed"
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        done = first[-1]["response"]
        assert done["output"][0]["content"][0]["text"] == "Hello from the fake."
        upstream = {k.lower(): v for k, v in fake_openai.requests[-1].headers.items()}
        assert upstream["x-appliance-session-id"] == "sess-42"
        assert not any(k.startswith("sec-websocket") for k in upstream)

        ws.send("not json")  # an error frame, and the socket stays usable
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["status"] == 400

        ws.send(json.dumps({"type": "response.create", "model": "fake/fake-chat", "input": "And again?",
                            "previous_response_id": done["id"]}))  # not stored: found in the connection
        second = events_until_done(ws)
        assert second[-1]["type"] == "response.completed"
        sent = fake_openai.requests[-1].body["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]

        ws.send(json.dumps({"type": "response.create", "model": "fake/fake-chat", "input": "x",
                            "previous_response_id": "resp_unknown"}))
        missing = json.loads(ws.recv(timeout=10))
        assert missing["error"]["code"] == "previous_response_not_found"


def test_websocket_handshake_needs_a_key(gateway: Appliance) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        websockets.sync.client.connect(ws_url(gateway), additional_headers={"Authorization": "Bearer sk-app-bad"})
    assert info.value.response.status_code == 401


def test_session_id_in_the_request_log(gateway: Appliance) -> None:
    """A WebSocket's session id (sent or generated) on every turn's row; an HTTP client's own one too."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Appliance-Session-ID": "sess-log-7"}
    with websockets.sync.client.connect(ws_url(gateway), additional_headers=headers) as ws:
        for text in ("one", "two"):
            ws.send(json.dumps({"type": "response.create", "model": "fake/fake-chat", "input": text}))
            assert events_until_done(ws)[-1]["type"] == "response.completed"
    rows = rows_where(gateway, "session_id = ?", ("sess-log-7",), count=2)
    assert [(r["endpoint"], r["status"], r["backend"]) for r in rows] == [("/v1/responses", 200, "fake")] * 2
    assert rows[0]["request_id"] != rows[1]["request_id"]

    with websockets.sync.client.connect(ws_url(gateway), additional_headers={
            "Authorization": f"Bearer {ADMIN_KEY}"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "fake/fake-chat", "input": "x",
                            "metadata": {"probe": "generated-session"}}))
        assert events_until_done(ws)[-1]["type"] == "response.completed"
    generated = rows_where(gateway, "session_id LIKE 'wsresp_%' AND endpoint = '/v1/responses'", (), count=1)
    assert len(generated[-1]["session_id"]) == len("wsresp_") + 36

    reply = sdk(gateway).chat.completions.with_raw_response.create(
        model="fake/fake-chat", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Appliance-Session-ID": "agent-run-9"})
    assert logged(gateway, reply.headers["x-request-id"])["session_id"] == "agent-run-9"
    plain = sdk(gateway).chat.completions.with_raw_response.create(
        model="fake/fake-chat", messages=[{"role": "user", "content": "hi"}])
    assert logged(gateway, plain.headers["x-request-id"])["session_id"] is None
