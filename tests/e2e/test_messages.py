"""The Anthropic Messages surface, driven by the official anthropic SDK, over chat-completions backends."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance

pytestmark = pytest.mark.frozen

HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def claude(gateway: Appliance) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=ADMIN_KEY, max_retries=0, timeout=60)


def test_create_returns_a_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="fake/fake-chat", max_tokens=64, messages=HELLO,
                                     system="Be brief.")
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text == "Hello from the fake."
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 11 and message.usage.output_tokens == 5
    assert message.model == "fake/fake-chat"


def test_stream_text_accumulated_by_the_sdk(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="fake/fake-chat", max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the fake."
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5


def test_tool_use_created_and_streamed(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="fake/fake-tools", max_tokens=64, messages=HELLO, tools=[WEATHER])
    tool = next(block for block in message.content if block.type == "tool_use")
    assert tool.name == "get_weather" and tool.input == {"city": "Tokyo"}
    assert message.stop_reason == "tool_use"
    with claude.messages.stream(model="fake/fake-tools", max_tokens=64, messages=HELLO, tools=[WEATHER]) as stream:
        final = stream.get_final_message()
    tool = next(block for block in final.content if block.type == "tool_use")
    assert tool.input == {"city": "Tokyo"} and final.stop_reason == "tool_use"


def test_event_sequence_on_the_wire(gateway: Appliance) -> None:
    body = {"model": "fake/fake-chat", "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/messages?beta=true", json=body, timeout=30,
                      headers={"x-api-key": ADMIN_KEY, "anthropic-version": "2023-06-01"}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("content_block_start") == names.count("content_block_stop") >= 1
    assert "message_delta" in names and names.index("message_delta") > names.index("content_block_stop")


def test_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="fake/fake-chat", messages=HELLO)
    assert counted.input_tokens > 0


def test_errors_in_anthropic_shape(gateway: Appliance, claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    assert missing.value.body["type"] == "error" and missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="fake/fake-chat", max_tokens=8, messages=[{"role": "user", "content": 5}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    response = httpx.post(gateway.url + "/v1/messages", json={"model": "fake/fake-chat", "messages": HELLO},
                          headers={"x-api-key": ADMIN_KEY})
    assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]
    stranger = anthropic.Anthropic(base_url=gateway.url, api_key="sk-app-wrong-key-00000000000000", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        stranger.messages.create(model="fake/fake-chat", max_tokens=8, messages=HELLO)
    assert denied.value.body["error"]["type"] == "authentication_error"


@pytest.mark.llamacpp
def test_real_server_through_messages(gateway: Appliance, llamacpp_url: str, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="tiny-chat", max_tokens=8, messages=HELLO)
    assert message.content and message.usage.input_tokens > 0
    with claude.messages.stream(model="tiny-chat", max_tokens=8, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
