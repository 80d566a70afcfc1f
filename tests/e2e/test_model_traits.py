"""What a model is configured to take: system messages (``system_role``) and images (``vision``), through every
chat-shaped surface against the scriptable fake (which records each request it gets)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes.openai_upstream import REPLY_TEXT, FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.batches import line, lines_of, poll, upload
from tests.support.ledger import rows_where
from tests.support.polling import eventually

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
            {"name": "textonly", "url": url, "discover": False, "models": ["fake-chat"]},
        ],
        "models": [
            {"name": "no-system", "target": "nosys/fake-chat", "system_role": False},
            # Its first target is a model that rejects the system role (an entry named after it says so); its
            # fallback is not.
            {"name": "mixed", "targets": ["nosys/fake-fail-1-500-traits", "fake/fake-chat"], "retries": 0},
            {"name": "fake-fail-1-500-traits", "system_role": False},
            {"name": "fake-chat", "system_role": True},  # says nothing new: messages go as sent
            {"name": "blind", "target": "textonly/fake-chat", "vision": False},
            # A text-only first target and one whose vision is unknown: the images are described once.
            {"name": "blind-twice", "targets": ["textonly/fake-fail-1-500-vision", "textonly/fake-chat"],
             "retries": 0, "vision": False},
        ],
        "vision": {"describer": "fake/describer", "max_tokens": 50},
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


# ------------------------------------------------------------------------------------------ images


def new_image() -> str:
    """A data: URL of bytes no other test sends (descriptions are cached by the image's hash)."""
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG" + os.urandom(24)).decode()


def look(url: str, text: str = "What is this?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def describer_calls(fake: FakeOpenAI, request_id: str) -> list[dict[str, Any]]:
    return [seen.body for seen in fake.chats()
            if seen.headers.get("X-Request-ID") == request_id and seen.body.get("model") == "describer"]


DESCRIBED = f"What is this?\n[Image: {REPLY_TEXT}]"


@pytest.mark.parametrize("stream", [False, True])
def test_images_for_a_text_only_model_are_described(client: openai.OpenAI, fake_openai: FakeOpenAI,
                                                    stream: bool) -> None:
    url = new_image()
    raw = client.chat.completions.with_raw_response.create(model="blind", messages=look(url), stream=stream)
    answer = raw.parse()
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream else \
        answer.choices[0].message.content
    assert text == REPLY_TEXT
    request_id = raw.headers["x-request-id"]
    (asked,) = describer_calls(fake_openai, request_id)
    assert asked["max_tokens"] == 50 and asked["stream"] is False
    assert asked["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": url}}
    assert sent_to(fake_openai, request_id, "fake-chat")["messages"] == [{"role": "user", "content": DESCRIBED}]


def sent_to(fake: FakeOpenAI, request_id: str, model: str) -> dict[str, Any]:
    return next(seen.body for seen in fake.chats()
                if seen.headers.get("X-Request-ID") == request_id and seen.body.get("model") == model)


def stored(app: Appliance, url: str) -> None:
    conn = sqlite3.connect(app.data_dir / "appliance.db")
    try:
        rows = conn.execute("SELECT description FROM image_descriptions WHERE image = ?",
                            (hashlib.sha256(base64.b64decode(url.partition(",")[2])).hexdigest(),)).fetchall()
    finally:
        conn.close()
    assert rows == [(REPLY_TEXT,)]


def test_the_same_image_again_is_described_from_the_cache(client: openai.OpenAI, app: Appliance,
                                                          fake_openai: FakeOpenAI) -> None:
    url = new_image()
    first = client.chat.completions.with_raw_response.create(model="blind", messages=look(url))
    assert len(describer_calls(fake_openai, first.headers["x-request-id"])) == 1
    eventually(lambda: stored(app, url))  # in the shared table within a flush interval: then every worker finds it
    cached_before = described_from_cache(app)
    for _ in range(3):  # whichever worker answers: its memory, or the table the other one wrote
        again = client.chat.completions.with_raw_response.create(model="blind", messages=look(url, "Again?"))
        request_id = again.headers["x-request-id"]
        assert describer_calls(fake_openai, request_id) == []
        assert sent_to(fake_openai, request_id, "fake-chat")["messages"][0]["content"] == \
            f"Again?\n[Image: {REPLY_TEXT}]"
    assert described_from_cache(app) == cached_before + 3


def described_from_cache(app: Appliance) -> float:
    """appliance_described_images_total from memory or the table, all workers."""
    text = httpx.get(app.url + "/metrics", timeout=10).text
    pattern = r'^appliance_described_images_total{source="(?:memory|table)"} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.M))


def test_two_images_one_described_once_across_targets_tried(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    url, other = new_image(), new_image()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "image_url", "image_url": {"url": other}},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    raw = client.chat.completions.with_raw_response.create(model="blind-twice", messages=messages)
    assert raw.headers["x-fallback-from"] == "textonly/fake-fail-1-500-vision"
    request_id = raw.headers["x-request-id"]
    assert len(describer_calls(fake_openai, request_id)) == 2  # two distinct images, whatever the targets
    tried = [seen.body for seen in fake_openai.chats() if seen.headers.get("X-Request-ID") == request_id
             and seen.body["model"] != "describer"]
    assert len(tried) == 2 and tried[0]["messages"] == tried[1]["messages"]
    assert tried[1]["messages"][0]["content"] == "\n".join([f"[Image: {REPLY_TEXT}]"] * 3)


def test_images_to_a_model_of_unknown_vision_pass_as_sent(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    messages = look(new_image())
    raw = client.chat.completions.with_raw_response.create(model="fake/fake-chat", messages=messages)
    request_id = raw.headers["x-request-id"]
    assert describer_calls(fake_openai, request_id) == []
    assert sent(fake_openai, request_id)["messages"] == messages


def test_a_messages_image_block_is_described(app: Appliance, fake_openai: FakeOpenAI) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0, timeout=30)
    data = new_image().partition(",")[2]
    raw = claude.messages.with_raw_response.create(model="blind", max_tokens=32, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}])
    assert raw.parse().content[0].text == REPLY_TEXT
    request_id = raw.headers["x-request-id"]
    assert len(describer_calls(fake_openai, request_id)) == 1
    assert sent_to(fake_openai, request_id, "fake-chat")["messages"] == [{"role": "user", "content": DESCRIBED}]


def test_a_responses_input_image_is_described(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="blind", store=False, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": new_image()}]}])
    assert raw.parse().output_text == REPLY_TEXT
    request_id = raw.headers["x-request-id"]
    assert len(describer_calls(fake_openai, request_id)) == 1
    assert sent_to(fake_openai, request_id, "fake-chat")["messages"] == [{"role": "user", "content": DESCRIBED}]


def test_a_batch_line_with_an_image_is_described(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    url = new_image()
    file_id = upload(client, [line("img", {"model": "blind", "messages": look(url)})])
    batch = poll(client, client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)
    assert batch.status == "completed", batch
    (result,) = lines_of(client, batch.output_file_id)
    assert result["response"]["status_code"] == 200
    described = [seen.body for seen in fake_openai.chats() if seen.body.get("model") == "describer"
                 and seen.body["messages"][0]["content"][1]["image_url"]["url"] == url]
    assert len(described) == 1


def test_describer_calls_are_in_the_ledger_under_the_key(client: openai.OpenAI, app: Appliance) -> None:
    raw = client.chat.completions.with_raw_response.create(model="blind", messages=look(new_image()))
    rows = rows_where(app, "request_id = ?", (raw.headers["x-request-id"],), count=2)
    by_model = {row["model"]: row for row in rows}
    assert set(by_model) == {"fake/describer", "blind"}
    described = by_model["fake/describer"]
    assert (described["backend"], described["backend_model"], described["status"]) == ("fake", "describer", 200)
    assert (described["prompt_tokens"], described["completion_tokens"]) == (11, 5)  # the fake's usage
    assert described["key_id"] == by_model["blind"]["key_id"]


def test_descriptions_outlive_a_restart(client: openai.OpenAI, app: Appliance, fake_openai: FakeOpenAI) -> None:
    url = new_image()
    first = client.chat.completions.with_raw_response.create(model="blind", messages=look(url))
    assert len(describer_calls(fake_openai, first.headers["x-request-id"])) == 1
    app.stop()  # the workers flush what they buffered; the new ones start with empty memories
    app.start()
    app.wait_ready()
    again = client.chat.completions.with_raw_response.create(model="blind", messages=look(url))
    assert describer_calls(fake_openai, again.headers["x-request-id"]) == []


# ------------------------------------------------------------------------------------------ without a describer


@pytest.fixture(scope="module")
def lonely(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI) -> Iterator[Appliance]:
    """No describer: images cannot reach a text-only model."""
    config = {"discovery": {"enabled": False, "interval_s": 300},
              "backends": [{"name": "textonly", "url": fake_openai.url + "/v1", "discover": False,
                            "models": ["fake-chat"]},
                           {"name": "fake", "url": fake_openai.url + "/v1"}],
              "models": [{"name": "blind", "target": "textonly/fake-chat", "vision": False},
                         {"name": "blind-then-seeing", "targets": ["textonly/fake-chat", "fake/fake-chat"]},
                         {"name": "textonly/fake-chat", "vision": False}]}
    app = Appliance(tmp_path_factory.mktemp("lonely"), config, workers=1)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def test_without_a_describer_images_for_a_text_only_model_are_a_501(lonely: Appliance) -> None:
    client = openai.OpenAI(base_url=lonely.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="blind", messages=look(new_image()), stream=stream)
        error = caught.value.body
        assert (error["code"], error["param"]) == ("unsupported", "messages")
        assert "takes no images" in error["message"] and "[vision] describer" in error["message"]
        assert caught.value.response.headers["x-request-id"]


def test_without_a_describer_a_target_that_takes_images_still_can(lonely: Appliance,
                                                                  fake_openai: FakeOpenAI) -> None:
    messages = look(new_image())
    response = httpx.post(lonely.url + "/v1/chat/completions", json={"model": "blind-then-seeing",
                          "messages": messages}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-appliance-backend"] == "fake"
    assert sent(fake_openai, response.headers["x-request-id"])["messages"] == messages


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI) -> Iterator[Appliance]:
    config = {"discovery": {"enabled": False, "interval_s": 300},
              "backends": [{"name": "fake", "url": fake_openai.url + "/v1"}],
              "models": [{"name": "blind", "target": "fake/fake-chat", "vision": False}],
              "vision": {"describer": "fake/fake-500"}}
    app = Appliance(tmp_path_factory.mktemp("failing"), config, workers=1)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def test_a_describer_failure_fails_the_request(failing: Appliance, fake_openai: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=failing.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="blind", messages=look(new_image()))
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "backend_error"
    assert "describer model 'fake/fake-500'" in caught.value.body["message"]
    request_id = caught.value.response.headers["x-request-id"]
    assert [seen.body["model"] for seen in fake_openai.chats() if seen.headers.get("X-Request-ID") == request_id] \
        == ["fake-500"]  # the text-only model never got the request


# ------------------------------------------------------------------------------------------ the real server


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI, llamacpp_url: str) -> Iterator[Appliance]:
    """The real llama.cpp server twice: as itself, and under a second name whose model lacks both traits."""
    config = {"discovery": {"enabled": False, "interval_s": 300},
              "backends": [{"name": "llamacpp", "url": llamacpp_url, "timeout_s": 120},
                           {"name": "plain", "url": llamacpp_url, "timeout_s": 120, "discover": False,
                            "models": ["tiny"]},
                           {"name": "fake", "url": fake_openai.url + "/v1"}],
              "models": [{"name": "plain/tiny", "system_role": False, "vision": False}],
              "vision": {"describer": "fake/describer"}}
    app = Appliance(tmp_path_factory.mktemp("real-traits"), config, workers=1)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def prompt_tokens(app: Appliance, model: str, messages: list[dict[str, Any]]) -> int:
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)
    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens > 0
    return completion.usage.prompt_tokens


@pytest.mark.llamacpp
def test_the_real_model_gets_no_system_message(real: Appliance) -> None:
    merged = prompt_tokens(real, "plain/tiny", [SYSTEM, HELLO])
    # The prompt the server built is the one for the merged text sent by hand, not the one with a system turn.
    assert merged == prompt_tokens(real, "llamacpp/tiny", [{"role": "user", "content": "Be brief.\n\nSay hello."}])
    assert merged != prompt_tokens(real, "llamacpp/tiny", [SYSTEM, HELLO])


@pytest.mark.llamacpp
def test_the_real_text_only_model_answers_a_described_image(real: Appliance, fake_openai: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=real.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(model="plain/tiny", messages=look(new_image()),
                                                           max_tokens=4, temperature=0)
    completion = raw.parse()
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens > 0
    assert len(describer_calls(fake_openai, raw.headers["x-request-id"])) == 1
    assert completion.usage.prompt_tokens == prompt_tokens(real, "llamacpp/tiny",
                                                           [{"role": "user", "content": DESCRIBED}])
