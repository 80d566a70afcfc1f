"""Guardrails on a real appliance (2 workers): selection, pii on input and output (whole and streamed), on every
chat-shaped surface (chat, completions, Messages over chat and over an Anthropic backend, Responses, batch lines),
the X-Guardrail-Status header, the request log and the metric.

The fakes script answers that hold personal data (tests/fakes/chat_scripts.py: ``script-pii``), so what the
backend received and what the client got can both be checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes.anthropic_upstream import API_KEY as ANTHROPIC_KEY
from tests.fakes.anthropic_upstream import TEXT_MODEL, FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.batches import CHAT_URL, line, lines_of, poll, upload
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen  # also run against the one-file binary (tests/run)

PROMPT = "My e-mail is bob@example.com and my card 4111 1111 1111 1111."
REDACTED_PROMPT = "My e-mail is [EMAIL] and my card [CARD]."
PII_ANSWER = "Write to [EMAIL] or call [PHONE], thanks."  # script-pii's answer, redacted
STATUS = "X-Guardrail-Status"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def base(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> dict[str, Any]:
    return {
        "discovery": {"enabled": False},
        "batches": {"poll_interval_s": 0.1},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]},
            {"name": "claude", "type": "anthropic", "url": fake_anthropic.url + "/v1", "api_key": ANTHROPIC_KEY,
             "discover": False, "models": [TEXT_MODEL]},
        ],
        "models": [{"name": "guarded", "target": "fake/fake-chat", "guardrails": ["pii"]},
                   {"name": "guarded-pii-answer", "target": "fake/script-pii", "guardrails": ["pii"]}],
        "guardrails": {
            "content_moderation": {"categories": {"weapons": ["bomb", "re:\\bguns?\\b"], "self-harm": ["hurt myself"]},
                                   "model": "fake/fake-moderation"},
            "schema_validation": {"schema": {"type": "object", "required": ["answer"]}},
        },
    }


@pytest.fixture(scope="module")
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI,
        fake_anthropic: FakeAnthropic) -> Appliance:
    app = Appliance(tmp_path_factory.mktemp("guardrails"), base(fake_openai, fake_anthropic))
    request.addfinalizer(app.stop)
    app.start()
    app.wait_ready()
    return app


@pytest.fixture(scope="module")
def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def claude(app: Appliance) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0, timeout=30)


def rid() -> str:
    return str(uuid.uuid4())


def user(text: str = PROMPT) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def log_row(app: Appliance, request_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any]:
        rows = [r for r in app.get("/admin/requests?limit=200")[1]["data"] if r["request_id"] == request_id]
        assert rows, f"no request-log row for {request_id}"
        return rows[0]

    return eventually(found)


# ------------------------------------------------------------------------------------------ selection


def test_the_backend_gets_the_redacted_prompt(app: Appliance, client: openai.OpenAI,
                                              fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = client.chat.completions.with_raw_response.create(
        model="fake/fake-chat", messages=user(), extra_body={"guardrails": ["pii"]},
        extra_headers={"X-Request-ID": request_id})
    assert raw.headers[STATUS] == "redacted"
    assert raw.parse().choices[0].message.content == "Hello from the fake."
    sent = fake_openai.find(request_id).body
    assert sent["messages"] == user(REDACTED_PROMPT)
    assert "guardrails" not in sent
    assert log_row(app, request_id)["guardrails"] == {"pii": "redacted"}


def test_the_header_selects_too_and_is_not_forwarded(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    parts = [{"type": "text", "text": "ping me at 10.0.0.1"}, {"type": "text", "text": "nothing here"}]
    raw = client.chat.completions.with_raw_response.create(
        model="fake/fake-chat", messages=[{"role": "user", "content": parts}],
        extra_headers={"X-Guardrails": "pii", "X-Request-ID": request_id})
    assert raw.headers[STATUS] == "redacted"
    seen = fake_openai.find(request_id)
    assert seen.body["messages"][0]["content"] == [{"type": "text", "text": "ping me at [IP]"}, parts[1]]
    assert not any(name.lower() == "x-guardrails" for name in seen.headers)


def test_a_clean_prompt_passes(app: Appliance, client: openai.OpenAI) -> None:
    request_id = rid()
    raw = client.chat.completions.with_raw_response.create(
        model="fake/fake-chat", messages=user("Nothing personal."), extra_body={"guardrails": ["pii"]},
        extra_headers={"X-Request-ID": request_id})
    assert raw.headers[STATUS] == "passed"
    assert log_row(app, request_id)["guardrails"] == {"pii": "passed"}


def test_no_guardrail_no_header_and_the_prompt_untouched(app: Appliance, client: openai.OpenAI,
                                                         fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = client.chat.completions.with_raw_response.create(model="fake/fake-chat", messages=user(),
                                                           extra_headers={"X-Request-ID": request_id})
    assert STATUS not in raw.headers
    assert fake_openai.find(request_id).body["messages"] == user()
    assert log_row(app, request_id)["guardrails"] is None


@pytest.mark.parametrize(("extra", "headers"), [({"guardrails": ["pii", "telepathy"]}, {}),
                                                ({"guardrails": "pii"}, {}),
                                                ({}, {"X-Guardrails": "pii, nope"})])
def test_an_unknown_guardrail_is_a_400_naming_the_param(client: openai.OpenAI, extra: dict[str, Any],
                                                         headers: dict[str, str]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="fake/fake-chat", messages=user(), extra_body=extra,
                                       extra_headers=headers)
    error = refused.value.body
    assert error["code"] == "invalid_value" and error["param"] == "guardrails"
    assert refused.value.response.headers["X-Request-ID"]


def test_a_route_enforces_its_guardrails(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = client.chat.completions.with_raw_response.create(model="guarded", messages=user(),
                                                           extra_headers={"X-Request-ID": request_id})
    assert raw.headers[STATUS] == "redacted"
    assert fake_openai.find(request_id).body["messages"] == user(REDACTED_PROMPT)


def test_a_key_enforces_its_guardrails_and_the_cli_sets_them(app: Appliance, fake_openai: FakeOpenAI) -> None:
    status, created, _ = app.post("/admin/keys", {"name": "guarded-key", "guardrails": ["pii"]})
    assert status == 201 and created["guardrails"] == ["pii"]
    keyed = openai.OpenAI(base_url=app.url + "/v1", api_key=created["key"], max_retries=0, timeout=30)
    request_id = rid()
    raw = keyed.chat.completions.with_raw_response.create(model="fake/fake-chat", messages=user(),
                                                          extra_headers={"X-Request-ID": request_id})
    assert raw.headers[STATUS] == "redacted"
    assert fake_openai.find(request_id).body["messages"] == user(REDACTED_PROMPT)
    status, bad, _ = app.post("/admin/keys", {"name": "x", "guardrails": ["telepathy"]})
    assert status == 400 and bad["error"]["param"].startswith("guardrails")
    done = app.cli("keys", "update", created["id"], "--guardrails", "pii,content_moderation")
    assert done.returncode == 0, done.stderr
    assert app.get(f"/admin/keys/{created['id']}")[1]["guardrails"] == ["pii", "content_moderation"]


# ------------------------------------------------------------------------------------------ answers


def test_a_whole_answer_is_redacted(app: Appliance, client: openai.OpenAI) -> None:
    request_id = rid()
    raw = client.chat.completions.with_raw_response.create(
        model="fake/script-pii", messages=user("hi"), extra_body={"guardrails": ["pii"]},
        extra_headers={"X-Request-ID": request_id})
    assert raw.parse().choices[0].message.content == PII_ANSWER
    assert raw.headers[STATUS] == "redacted"
    assert log_row(app, request_id)["guardrails"] == {"pii": "redacted"}


def test_a_streamed_answer_is_redacted(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="guarded-pii-answer", messages=user("hi"), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PII_ANSWER
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_a_stream_without_output_guardrails_is_forwarded_byte_for_byte(app: Appliance) -> None:
    body = {"model": "fake/script-pii", "messages": user("hi"), "stream": True}
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        raw = response.read()
    assert b'"content": "Write to jane."' in raw and b'"content": "doe@exam"' in raw  # the fake's own chunks
    assert STATUS not in response.headers


def test_completions_prompt_and_answer(app: Appliance, client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = client.completions.with_raw_response.create(
        model="fake/fake-chat", prompt="Reach me on +1 (555) 123-4567", extra_body={"guardrails": ["pii"]},
        extra_headers={"X-Request-ID": request_id})
    assert raw.headers[STATUS] == "redacted"
    assert fake_openai.find(request_id).body["prompt"] == "Reach me on [PHONE]"
    # A completions stream has no finish chunk on the fake: what was held back goes out when it ends.
    stream = client.completions.create(model="fake/fake-chat", prompt="hi", stream=True,
                                       extra_body={"guardrails": ["pii"]})
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello from the fake."


# ------------------------------------------------------------------------------------------ surfaces


def test_messages_over_a_chat_backend(claude: anthropic.Anthropic, fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = claude.messages.with_raw_response.create(
        model="fake/script-pii", max_tokens=64, messages=user(), extra_body={"guardrails": ["pii"]},
        extra_headers={"X-Request-ID": request_id})
    message = raw.parse()
    assert message.content[0].text == PII_ANSWER
    assert raw.headers[STATUS] == "redacted"
    assert fake_openai.find(request_id).body["messages"] == user(REDACTED_PROMPT)
    with claude.messages.stream(model="fake/script-pii", max_tokens=64, messages=user("hi"),
                                extra_headers={"X-Guardrails": "pii"}) as stream:
        assert "".join(stream.text_stream) == PII_ANSWER


def test_messages_to_an_anthropic_backend_take_the_guarded_path(claude: anthropic.Anthropic,
                                                                 fake_anthropic: FakeAnthropic) -> None:
    raw = claude.messages.with_raw_response.create(model=f"claude/{TEXT_MODEL}", max_tokens=64, messages=user(),
                                                   extra_body={"guardrails": ["pii"]})
    assert raw.headers[STATUS] == "redacted"
    assert raw.parse().content[0].text == "Hello from Claude."
    sent = fake_anthropic.last().body
    assert sent["messages"] == [{"role": "user", "content": REDACTED_PROMPT}] and "guardrails" not in sent
    with claude.messages.stream(model=f"claude/{TEXT_MODEL}", max_tokens=64, messages=user(),
                                extra_headers={"X-Guardrails": "pii"}) as stream:
        assert "".join(stream.text_stream) == "Hello from Claude."
    assert fake_anthropic.last().body["messages"] == [{"role": "user", "content": REDACTED_PROMPT}]


def test_messages_only_an_anthropic_backend_can_take_are_refused_not_passed_unread(
        claude: anthropic.Anthropic, fake_anthropic: FakeAnthropic) -> None:
    document = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                               "data": "JVBERi0xLjQK"}}
    content = [document, {"type": "text", "text": "Summarise it."}]
    sent_before = len(fake_anthropic.seen("/v1/messages"))
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=f"claude/{TEXT_MODEL}", max_tokens=64,
                               messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
                               extra_body={"guardrails": ["pii"]})
    assert "Guardrails cannot check" in str(refused.value)
    assert len(fake_anthropic.seen("/v1/messages")) == sent_before
    passed = claude.messages.create(model=f"claude/{TEXT_MODEL}", max_tokens=64,
                                    messages=[{"role": "user", "content": content}])  # type: ignore[list-item]
    assert passed.content[0].text == "Hello from Claude."  # without guardrails it passes through


def test_responses(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = client.responses.with_raw_response.create(model="fake/script-pii", input=PROMPT,
                                                    extra_body={"guardrails": ["pii"]},
                                                    extra_headers={"X-Request-ID": request_id})
    response = raw.parse()
    assert response.output_text == PII_ANSWER and raw.headers[STATUS] == "redacted"
    assert fake_openai.find(request_id).body["messages"][-1]["content"] == REDACTED_PROMPT
    stored = client.responses.input_items.list(response.id).data  # the store keeps the redacted input only
    assert stored[0].content[0].text == REDACTED_PROMPT  # type: ignore[union-attr]
    follow = client.responses.create(model="fake/fake-chat", input="and then?", previous_response_id=response.id)
    assert PROMPT not in str(fake_openai.chats()[-1].body) and follow.output_text == "Hello from the fake."
    stream = client.responses.create(model="fake/script-pii", input="hi", stream=True,
                                     extra_headers={"X-Guardrails": "pii"})
    deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
    assert "".join(deltas) == PII_ANSWER


def test_a_batch_line(client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    body = {"model": "fake/script-pii", "messages": user(), "guardrails": ["pii"]}
    done = poll(client, client.batches.create(input_file_id=upload(client, [line("g1", body)]), endpoint=CHAT_URL,
                                              completion_window="24h").id)
    assert done.status == "completed", done
    (result,) = lines_of(client, done.output_file_id)
    assert result["response"]["body"]["choices"][0]["message"]["content"] == PII_ANSWER
    assert any(seen.body.get("messages") == user(REDACTED_PROMPT) for seen in fake_openai.chats()
               if isinstance(seen.body, dict))


def test_the_metric_counts_outcomes(app: Appliance, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="guarded", messages=user())

    def counted() -> None:
        scrape = httpx.get(app.url + "/metrics", timeout=10).text
        assert 'appliance_guardrail_total{guardrail="pii",outcome="redacted"}' in scrape

    eventually(counted)


# ------------------------------------------------------------------------------------------ content_moderation


def moderation_inputs(fake_openai: FakeOpenAI) -> list[Any]:
    return [seen.body["input"] for seen in fake_openai.requests if seen.path == "/v1/moderations"]


@pytest.mark.parametrize(("text", "category"), [("How do I build a BOMB?", "weapons"),
                                                ("where to buy guns cheaply", "weapons"),
                                                ("I want to hurt   myself", "self-harm")])
def test_configured_terms_block_the_request(client: openai.OpenAI, fake_openai: FakeOpenAI, text: str,
                                            category: str) -> None:
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="fake/fake-chat", messages=user(text),
                                       extra_body={"guardrails": ["content_moderation"]},
                                       extra_headers={"X-Request-ID": request_id})
    error = refused.value.body
    assert error["code"] == "guardrail_blocked" and error["param"] == "messages"
    assert "content_moderation" in error["message"] and category in error["message"]
    assert text not in error["message"]
    assert refused.value.response.headers[STATUS] == "blocked"
    with pytest.raises(LookupError):
        fake_openai.find(request_id)


def test_terms_are_whole_words(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fake/fake-chat", messages=user("The bombastic gunslinger"), extra_headers={
            "X-Guardrails": "content_moderation"})
    assert raw.headers[STATUS] == "passed"


def test_the_moderation_model_is_asked_and_its_flags_block(app: Appliance, client: openai.OpenAI,
                                                           fake_openai: FakeOpenAI) -> None:
    client.chat.completions.create(model="fake/fake-chat", messages=user("A calm question."),
                                   extra_body={"guardrails": ["content_moderation"]})
    assert ["A calm question."] in moderation_inputs(fake_openai)
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="fake/fake-chat", messages=user("a threat <flag:violence>"),
                                       extra_body={"guardrails": ["content_moderation"]},
                                       extra_headers={"X-Request-ID": request_id})
    assert refused.value.body["code"] == "guardrail_blocked" and "violence" in refused.value.body["message"]
    assert log_row(app, request_id)["guardrails"] == {"content_moderation": "blocked"}


def test_answers_are_moderated_whole_and_streamed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="fake/script-unsafe", messages=user("hi"),
                                       extra_body={"guardrails": ["content_moderation"]})
    assert "answer" in refused.value.body["message"] and "weapons" in refused.value.body["message"]
    stream = client.chat.completions.create(model="fake/script-unsafe", messages=user("hi"), stream=True,
                                            extra_body={"guardrails": ["content_moderation"]})
    text: list[str] = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert ended.value.body["code"] == "guardrail_blocked"
    # The chunk that completed the flagged term ("bo" + "mb at home.") never went out.
    assert "".join(text) == "Here is how to build a bo"


def test_messages_blocked_in_anthropic_shape(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=f"claude/{TEXT_MODEL}", max_tokens=64, messages=user("build a bomb"),
                               extra_headers={"X-Guardrails": "content_moderation"})
    assert "weapons" in str(refused.value) and refused.value.response.headers[STATUS] == "blocked"


# ------------------------------------------------------------------------------------------ schema_validation


def test_a_valid_answer_passes(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fake/script-person", messages=user("Who?"), response_format=PERSON_FORMAT,
        extra_body={"guardrails": ["schema_validation"]})
    assert raw.headers[STATUS] == "passed"
    assert raw.parse().choices[0].message.content == '{"name":"Ana","age":3}'


def test_one_repair_attempt_fixes_the_answer(app: Appliance, client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    request_id = rid()
    raw = client.chat.completions.with_raw_response.create(
        model="fake/script-json-on-repair", messages=user("Who?"), response_format=PERSON_FORMAT,
        extra_body={"guardrails": ["schema_validation"]}, extra_headers={"X-Request-ID": request_id})
    assert raw.parse().choices[0].message.content == '{"name":"Ana","age":3}'
    assert raw.headers[STATUS] == "passed"
    sent = [seen.body for seen in fake_openai.chats() if seen.headers.get("X-Request-ID") == request_id]
    assert len(sent) == 2 and "guardrails" not in sent[1]
    repair = sent[1]["messages"]
    assert repair[:-2] == user("Who?") and repair[-2] == {"role": "assistant",
                                                          "content": "Sure! The person is Ana, aged 3."}
    assert "not JSON" in repair[-1]["content"] and "corrected JSON" in repair[-1]["content"]
    row = log_row(app, request_id)
    assert row["guardrails"] == {"schema_validation": "passed"} and row["prompt_tokens"] == 20
    assert raw.parse().usage.prompt_tokens == 20  # both attempts


def test_a_failed_repair_is_a_422_with_the_validators_message(app: Appliance, client: openai.OpenAI) -> None:
    request_id = rid()
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.chat.completions.create(
            model="fake/script-pii", messages=user("Who?"), response_format=PERSON_FORMAT,
            extra_body={"guardrails": ["schema_validation"]}, extra_headers={"X-Request-ID": request_id})
    error = failed.value.body
    assert error["code"] == "guardrail_failed" and "not JSON" in error["message"]
    assert failed.value.response.headers[STATUS] == "failed"
    assert log_row(app, request_id)["guardrails"] == {"schema_validation": "failed"}


def test_the_configured_schema_and_the_validators_words(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.chat.completions.create(model="fake/script-person", messages=user("Who?"),
                                       extra_headers={"X-Guardrails": "schema_validation"})
    assert "'answer' is a required property" in failed.value.body["message"]


def test_a_stream_is_validated_when_it_ends(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="fake/script-person", messages=user("Who?"), stream=True,
                                                 response_format=PERSON_FORMAT,
                                                 extra_body={"guardrails": ["schema_validation"]}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == '{"name":"Ana","age":3}'
    stream = client.chat.completions.create(model="fake/script-not-json", messages=user("Who?"), stream=True,
                                            response_format=PERSON_FORMAT,
                                            extra_body={"guardrails": ["schema_validation"]})
    text: list[str] = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert ended.value.body["code"] == "guardrail_failed"
    assert "".join(text) == "Sure! The person is Ana, aged 3."  # no repair: these bytes had gone out


def test_responses_text_format_is_the_schema(client: openai.OpenAI) -> None:
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    response = client.responses.create(model="fake/script-person", input="Who?", text=text,  # type: ignore[arg-type]
                                       extra_body={"guardrails": ["schema_validation"]})
    assert response.output_text == '{"name":"Ana","age":3}'


# ------------------------------------------------------------------------------------------ block mode


@pytest.fixture(scope="module")
def blocking(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI,
             fake_anthropic: FakeAnthropic) -> Iterator[Appliance]:
    """Every request gets pii in block mode ([guardrails] enforce)."""
    config = {**base(fake_openai, fake_anthropic), "guardrails": {"enforce": ["pii"], "pii": {"mode": "block"}}}
    app = Appliance(tmp_path_factory.mktemp("guardrails-block"), config)
    try:
        app.start()
        yield app
    finally:
        app.stop()


def test_block_mode_refuses_with_the_kinds_never_the_values(blocking: Appliance, fake_openai: FakeOpenAI) -> None:
    sdk = openai.OpenAI(base_url=blocking.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    request_id = rid()
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="fake/fake-chat", messages=user(),
                                    extra_headers={"X-Request-ID": request_id})
    error = refused.value.body
    assert error["code"] == "guardrail_blocked" and error["param"] == "messages"
    assert "pii" in error["message"] and "email" in error["message"] and "card" in error["message"]
    assert "bob@example.com" not in error["message"] and "4111" not in error["message"]
    assert refused.value.response.headers[STATUS] == "blocked"
    with pytest.raises(LookupError):
        fake_openai.find(request_id)  # never sent
    assert log_row(blocking, request_id)["guardrails"] == {"pii": "blocked"}


def test_schema_validation_without_a_schema_is_a_400(blocking: Appliance) -> None:
    status, body, _ = blocking.post("/v1/chat/completions", {
        "model": "fake/fake-chat", "messages": user("hi"), "guardrails": ["schema_validation"]})
    assert status == 400 and body["error"]["param"] == "response_format"


def test_block_mode_on_answers(blocking: Appliance) -> None:
    sdk = openai.OpenAI(base_url=blocking.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="fake/script-pii", messages=user("hi"))
    assert refused.value.body["code"] == "guardrail_blocked" and "answer" in refused.value.body["message"]
    stream = sdk.chat.completions.create(model="fake/script-pii", messages=user("hi"), stream=True)
    text: list[str] = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "guardrail_blocked" in str(ended.value.body)
    assert "".join(text) == "Write to "  # what came before the address went out; the address never did


# ------------------------------------------------------------------------------------------ the real server


@pytest.mark.llamacpp
def test_a_redacted_prompt_through_llamacpp(gateway: Appliance, llamacpp_url: str) -> None:
    """The real server answers normally; it saw the redacted prompt: its own token count says so (the same as
    for the redacted text sent as is, not the original's)."""
    real = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)

    def ready() -> None:
        assert gateway.get("/ready")[1]["backends"]["llamacpp"]["state"] == "ready"

    eventually(ready, timeout=30)
    prompt = "Please write to alice.smith@example.org about the invoice."
    raw = real.chat.completions.with_raw_response.create(model="tiny-chat", messages=user(prompt), max_tokens=4,
                                                         extra_body={"guardrails": ["pii"]})
    answer = raw.parse()
    assert raw.headers[STATUS] == "redacted"
    assert answer.choices[0].finish_reason in ("length", "stop") and answer.usage.completion_tokens > 0
    assert log_row(gateway, raw.headers["x-request-id"])["guardrails"] == {"pii": "redacted"}
    redacted = real.chat.completions.create(model="tiny-chat", messages=user(prompt.replace(
        "alice.smith@example.org", "[EMAIL]")), max_tokens=4)
    original = real.chat.completions.create(model="tiny-chat", messages=user(prompt), max_tokens=4)
    assert answer.usage.prompt_tokens == redacted.usage.prompt_tokens != original.usage.prompt_tokens
