"""What a model is configured to take: system messages (``system_role``) and images (``vision``), through every
chat-shaped surface against the scriptable fake (which records each request it gets)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance

pytestmark = pytest.mark.frozen

SYSTEM = {"role": "system", "content": "Be brief."}
HELLO = {"role": "user", "content": "Say hello."}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI) -> Iterator[Appliance]:
    url = fake_openai.url + "/v1"
    config: dict[str, Any] = {
        "discovery": {"enabled": False, "interval_s": 300},
        "backends": [
            {"name": "fake", "url": url},
            # The fake again, under names whose models are configured to lack a trait.
            {"name": "nosys", "url": url, "discover": False, "models": ["fake-chat"]},
        ],
        "models": [
            {"name": "no-system", "target": "nosys/fake-chat", "system_role": False},
            # Its first target is a model that rejects the system role (an entry named after it says so); its
            # fallback is not.
            {"name": "mixed", "targets": ["nosys/fake-fail-1-500-traits", "fake/fake-chat"], "retries": 0},
            {"name": "fake-fail-1-500-traits", "system_role": False},
            {"name": "fake-chat", "system_role": True},  # says nothing new: messages go as sent
        ],
    }
    app = Appliance(tmp_path_factory.mktemp("traits"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)


def sent(fake: FakeOpenAI, request_id: str) -> dict[str, Any]:
    return fake.find(request_id).body


# ------------------------------------------------------------------------------------------ system messages


@pytest.mark.parametrize("stream", [False, True])
def test_system_text_is_merged_for_a_model_without_the_role(client: openai.OpenAI, fake_openai: FakeOpenAI,
                                                            stream: bool) -> None:
    messages = [SYSTEM, {"role": "developer", "content": "Be kind."}, HELLO]
    raw = client.chat.completions.with_raw_response.create(model="no-system", messages=messages, stream=stream)
    answer = raw.parse()
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream else \
        answer.choices[0].message.content
    assert text == "Hello from the fake."
    body = sent(fake_openai, raw.headers["x-request-id"])
    assert body["messages"] == [{"role": "user", "content": "Be brief.\nBe kind.\n\nSay hello."}]


def test_other_models_get_the_messages_as_sent(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    for model in ("fake/fake-chat", "fake-chat"):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=[SYSTEM, HELLO])
        assert sent(fake_openai, raw.headers["x-request-id"])["messages"] == [SYSTEM, HELLO]


def test_the_rule_is_applied_per_target_tried(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    # The first target gets the merged body and fails; the fallback, a model with the role, gets it as sent.
    raw = client.chat.completions.with_raw_response.create(model="mixed", messages=[SYSTEM, HELLO])
    assert raw.headers["x-fallback-from"] == "nosys/fake-fail-1-500-traits"
    request_id = raw.headers["x-request-id"]
    tried = [seen.body for seen in fake_openai.chats() if seen.headers.get("X-Request-ID") == request_id]
    assert [b["model"] for b in tried] == ["fake-fail-1-500-traits", "fake-chat"]
    assert tried[0]["messages"] == [{"role": "user", "content": "Be brief.\n\nSay hello."}]
    assert tried[1]["messages"] == [SYSTEM, HELLO]


def test_messages_system_reaches_the_model_in_the_user_turn(app: Appliance, fake_openai: FakeOpenAI) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0, timeout=30)
    raw = claude.messages.with_raw_response.create(model="no-system", max_tokens=32, system="Be brief.",
                                                   messages=[{"role": "user", "content": "Say hello."}])
    assert raw.parse().content[0].text == "Hello from the fake."
    body = sent(fake_openai, raw.headers["x-request-id"])
    assert body["messages"] == [{"role": "user", "content": "Be brief.\n\nSay hello."}]


def test_responses_instructions_reach_the_model_in_the_user_turn(client: openai.OpenAI,
                                                                 fake_openai: FakeOpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="no-system", instructions="Be brief.", input="Say hello.",
                                                    store=False)
    assert raw.parse().output_text == "Hello from the fake."
    body = sent(fake_openai, raw.headers["x-request-id"])
    assert body["messages"] == [{"role": "user", "content": "Be brief.\n\nSay hello."}]
