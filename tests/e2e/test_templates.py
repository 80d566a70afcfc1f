"""Prompt templates end to end: the admin API and CLI, and their use on every chat-shaped surface, 2 workers.

One private appliance over the shared fakes (OpenAI-compatible, Anthropic for the Messages passthrough) and
the real llama.cpp server. What a backend was sent is read from the fakes; the request log from SQLite.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.fakes.anthropic_upstream import API_KEY as ANTHROPIC_KEY
from tests.fakes.anthropic_upstream import TEXT_MODEL, FakeAnthropic
from tests.fakes.openai_upstream import REPLY_TEXT, FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.batches import CHAT_URL, line, lines_of, poll, upload
from tests.support.engines import ENGINES, database_config
from tests.support.ledger import logged, rows_where
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SUPPORT = {
    "description": "Product support",
    "messages": [{"role": "system", "content": "You support {{ product }}. Answer in {{language}}."},
                 {"role": "user", "content": [{"type": "text", "text": "My product is {{product}}."}]}],
    "variables": {"product": {"description": "the product"}, "language": {"default": "English"}},
}
SYSTEM_V1 = "You support Widget. Answer in English."
QUESTION = [{"role": "user", "content": "It does not start."}]


@pytest.fixture(scope="module", params=ENGINES)
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI,
        fake_ollama: Any, fake_anthropic: FakeAnthropic, llamacpp_port: int) -> Appliance:
    config = base_config(fake_openai, fake_ollama, llamacpp_port)
    config["backends"] = [*config["backends"], {"name": "claude", "type": "anthropic", "url": fake_anthropic.url,
                                                "api_key": ANTHROPIC_KEY, "discover": False,
                                                "models": [TEXT_MODEL]}]
    config["templates"] = {"cache_ttl_s": 0.5}
    config["batches"] = {"poll_interval_s": 0.1}
    config["embeddings"] = {"model": "fake/fake-embed"}
    config["router"] = {"profiles": [{"name": "anything", "model": "chat", "description": "Anything at all."}]}
    config.update(database_config(request, "e2e_templates"))
    app = Appliance(tmp_path_factory.mktemp("templates"), config)
    request.addfinalizer(app.stop)
    app.start()
    app.wait_ready()
    return app


@pytest.fixture(scope="module")
def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def support(app: Appliance) -> str:
    """The "support" template, version 1."""
    status, body, _ = app.post("/admin/templates", {"id": "support", **SUPPORT})
    assert status == 201, body
    return "support"


def admin(method: str, app: Appliance, path: str, body: Any = None, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.request(method, app.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def new_template(app: Appliance, template_id: str, **fields: Any) -> dict[str, Any]:
    response = admin("POST", app, "/admin/templates", {"id": template_id, **SUPPORT, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def error_of(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


# ------------------------------------------------------------------------------------------ the admin API


def test_create_list_get_version_delete(app: Appliance) -> None:
    created = new_template(app, "crud")
    assert {k: created[k] for k in ("object", "id", "version", "latest_version", "description")} == {
        "object": "template.version", "id": "crud", "version": 1, "latest_version": 1,
        "description": "Product support"}
    assert created["messages"] == SUPPORT["messages"] and created["variables"] == SUPPORT["variables"]

    taken = admin("POST", app, "/admin/templates", {"id": "crud", **SUPPORT})
    assert taken.status_code == 409 and error_of(taken)["code"] == "already_exists" and error_of(taken)["param"] == "id"

    added = admin("POST", app, "/admin/templates/crud/versions",
                  {"messages": [{"role": "system", "content": "Brief support for {{product}}."}],
                   "variables": {"product": {}}, "description": "Brief"})
    assert added.status_code == 201 and added.json()["version"] == 2

    listed = admin("GET", app, "/admin/templates").json()
    assert listed["object"] == "list"
    row = next(t for t in listed["data"] if t["id"] == "crud")
    assert (row["latest_version"], row["description"]) == (2, "Brief")
    assert row["updated_at"] >= row["created_at"]

    assert admin("GET", app, "/admin/templates/crud").json()["version"] == 2
    first = admin("GET", app, "/admin/templates/crud?version=1").json()
    assert (first["version"], first["latest_version"], first["description"]) == (1, 2, "Product support")
    versions = admin("GET", app, "/admin/templates/crud/versions").json()
    assert [v["version"] for v in versions["data"]] == [1, 2]

    deleted = admin("DELETE", app, "/admin/templates/crud")
    assert deleted.json() == {"id": "crud", "object": "template", "deleted": True, "versions": 2}
    for path in ("/admin/templates/crud", "/admin/templates/crud/versions"):
        gone = admin("GET", app, path)
        assert gone.status_code == 404 and error_of(gone)["code"] == "not_found"
    assert admin("DELETE", app, "/admin/templates/crud").status_code == 404
    assert all(t["id"] != "crud" for t in admin("GET", app, "/admin/templates").json()["data"])


@pytest.mark.parametrize(("body", "param", "named"), [
    ({"id": "x", "messages": [{"role": "user", "content": "Hi {{ who }} and {{what}}"}],
      "variables": {"who": {}}}, "variables", "what"),
    ({"id": "Not A Slug", "messages": [{"role": "user", "content": "Hi"}]}, "id", None),
    ({"id": "x", "messages": []}, "messages", None),
    ({"id": "x", "messages": [{"role": "tool", "content": "Hi"}]}, "messages.[0].role", None),
    ({"id": "x", "messages": [{"role": "user", "content": "Hi"}], "variables": {"a": {"default": 3}}},
     "variables.a.default", None),
])
def test_bad_templates_are_400_naming_the_field(app: Appliance, body: dict[str, Any], param: str,
                                                named: str | None) -> None:
    response = admin("POST", app, "/admin/templates", body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if named is not None:
        assert named in error["message"] and "who" not in error["message"]


def test_unknown_ids_and_versions(app: Appliance, support: str) -> None:
    assert error_of(admin("GET", app, "/admin/templates/nope"))["param"] == "id"
    missing = admin("GET", app, f"/admin/templates/{support}?version=99")
    assert missing.status_code == 404 and error_of(missing)["param"] == "version"
    bad = admin("GET", app, f"/admin/templates/{support}?version=first")
    assert bad.status_code == 400 and error_of(bad)["param"] == "version"
    no_such = admin("POST", app, "/admin/templates/nope/versions", {"messages": [{"role": "user", "content": "x"}]})
    assert no_such.status_code == 404


def test_only_admin_keys_manage_templates(app: Appliance) -> None:
    status, key, _ = app.post("/admin/keys", {"name": "templates-user", "role": "user"})
    assert status == 201
    refused = admin("GET", app, "/admin/templates", key=key["key"])
    assert refused.status_code == 403 and error_of(refused)["code"] == "endpoint_not_allowed"


# ------------------------------------------------------------------------------------------ chat completions


def test_chat_gets_the_rendered_messages_first(app: Appliance, client: openai.OpenAI, fake_openai: FakeOpenAI,
                                               support: str) -> None:
    own = [{"role": "system", "content": "Be brief."}, *QUESTION]
    reply = client.chat.completions.with_raw_response.create(
        model="chat", messages=own, extra_body={"template": {"id": support, "variables": {"product": "Widget"}}})
    assert reply.parse().choices[0].message.content == REPLY_TEXT
    sent = fake_openai.last_chat()
    assert "template" not in sent
    assert sent["messages"] == [
        {"role": "system", "content": SYSTEM_V1}, {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "My product is Widget."}]}, *QUESTION]
    assert logged(app, reply.headers["x-request-id"])["template"] == "support@1"


def test_a_template_may_be_the_whole_prompt_and_streams(app: Appliance, fake_openai: FakeOpenAI,
                                                        support: str) -> None:
    use = {"id": support, "version": 1, "variables": {"product": "Gadget", "language": "French"}}
    for messages in (None, []):
        body = {"model": "chat", "template": use, **({"messages": messages} if messages is not None else {})}
        response = httpx.post(app.url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=30)
        assert response.status_code == 200, response.text
        assert [m["role"] for m in fake_openai.last_chat()["messages"]] == ["system", "user"]
    with httpx.stream("POST", app.url + "/v1/chat/completions", headers=ADMIN, timeout=30,
                      json={"model": "chat", "stream": True, "template": use, "messages": QUESTION}) as streamed:
        assert streamed.status_code == 200
        assert streamed.read().rstrip().endswith(b"data: [DONE]")
    sent = fake_openai.last_chat()
    assert sent["stream"] is True
    assert sent["messages"][0] == {"role": "system", "content": "You support Gadget. Answer in French."}
    assert sent["messages"][-1] == QUESTION[0]


def test_a_pinned_version_stays_and_latest_follows(app: Appliance, client: openai.OpenAI,
                                                   fake_openai: FakeOpenAI) -> None:
    new_template(app, "pinning")

    def system_sent(version: int | None) -> str:
        use: dict[str, Any] = {"id": "pinning", "variables": {"product": "Widget"}}
        if version is not None:
            use["version"] = version
        client.chat.completions.create(model="chat", messages=QUESTION, extra_body={"template": use})
        return fake_openai.last_chat()["messages"][0]["content"]

    assert system_sent(None) == system_sent(1) == SYSTEM_V1
    added = admin("POST", app, "/admin/templates/pinning/versions",
                  {"messages": [{"role": "system", "content": "v2 for {{product}}"}], "variables": {"product": {}}})
    assert added.status_code == 201

    def latest_is_v2() -> None:  # every worker, within templates.cache_ttl_s
        assert [system_sent(None) for _ in range(4)] == ["v2 for Widget"] * 4

    eventually(latest_is_v2)
    assert system_sent(1) == SYSTEM_V1
    assert system_sent(2) == "v2 for Widget"


@pytest.mark.parametrize(("use", "status", "param", "named"), [
    ({"id": "support"}, 400, "template.variables", "product"),
    ({"id": "support", "variables": {"product": "W", "colour": "red"}}, 400, "template.variables", "colour"),
    ({"id": "support", "variables": {"product": ["W"]}}, 400, "template.variables", "product"),
    ({"id": "no-such-template"}, 404, "template.id", "no-such-template"),
    ({"id": "support", "version": 42, "variables": {"product": "W"}}, 404, "template.version", "42"),
    ({"id": "support", "version": "1"}, 400, "template.version", None),
    ("support", 400, "template", None),
])
def test_request_errors_name_the_template_field(client: openai.OpenAI, support: str, use: Any, status: int,
                                                param: str, named: str | None) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="chat", messages=QUESTION, extra_body={"template": use})
    error = caught.value
    assert error.status_code == status
    assert isinstance(error.body, dict) and error.body["param"] == param
    assert error.request_id
    if named is not None:
        assert named in error.body["message"]


def test_template_on_an_endpoint_that_is_not_chat(app: Appliance, support: str) -> None:
    response = httpx.post(app.url + "/v1/completions", headers=ADMIN, timeout=30,
                          json={"model": "chat", "prompt": "x", "template": {"id": support}})
    assert response.status_code == 400 and error_of(response)["param"] == "template"


# ------------------------------------------------------------------------------------------ Messages and Responses


def test_messages_over_a_chat_backend(app: Appliance, fake_openai: FakeOpenAI, support: str) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0)
    message = claude.messages.create(model="chat", max_tokens=50, system="Be brief.", messages=QUESTION,
                                     extra_body={"template": {"id": support, "variables": {"product": "Widget"}}})
    assert message.content[0].text == REPLY_TEXT  # type: ignore[union-attr]
    sent = fake_openai.last_chat()
    assert sent["messages"][0] == {"role": "system", "content": SYSTEM_V1 + "\n\nBe brief."}
    rest = json.dumps(sent["messages"][1:])
    assert rest.index("My product is Widget.") < rest.index("It does not start.")


def test_messages_passed_through_to_an_anthropic_backend(app: Appliance, fake_anthropic: FakeAnthropic,
                                                         support: str) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0)
    raw = claude.messages.with_raw_response.create(
        model=TEXT_MODEL, max_tokens=50, messages=QUESTION,
        extra_body={"template": {"id": support, "variables": {"product": "Widget"}}})
    assert raw.status_code == 200
    sent = fake_anthropic.last().body
    assert "template" not in sent
    assert sent["system"] == SYSTEM_V1
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "My product is Widget."}]},
                                *QUESTION]
    assert logged(app, raw.headers["x-request-id"])["template"] == "support@1"


def test_messages_errors_in_anthropic_shape(app: Appliance, support: str) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="chat", max_tokens=50, messages=QUESTION, extra_body={"template": {"id": "nope"}})
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="chat", max_tokens=50, messages=QUESTION, extra_body={"template": {"id": support}})
    assert "product" in str(caught.value)


def test_the_router_judges_the_rendered_prompt(app: Appliance, fake_openai: FakeOpenAI, support: str) -> None:
    use = {"id": support, "variables": {"product": "Routed"}}
    decision = httpx.post(app.url + "/v1/router", headers=ADMIN, timeout=30,
                          json={"template": use, "execute": False})  # no messages: the template's alone
    assert decision.status_code == 200, decision.text
    assert decision.json()["profile"] == "anything"
    answered = httpx.post(app.url + "/v1/router", headers=ADMIN, timeout=30,
                          json={"template": use, "messages": QUESTION})
    assert answered.status_code == 200, answered.text
    system = {"role": "system", "content": "You support Routed. Answer in English."}
    assert fake_openai.last_chat()["messages"][0] == system
    assert logged(app, answered.headers["x-request-id"])["template"] == "support@1"


def test_count_tokens_counts_the_template(app: Appliance, support: str) -> None:
    claude = anthropic.Anthropic(base_url=app.url, api_key=ADMIN_KEY, max_retries=0)
    bare = claude.messages.count_tokens(model="chat", messages=QUESTION)
    templated = claude.messages.count_tokens(model="chat", messages=QUESTION, extra_body={
        "template": {"id": support, "variables": {"product": "Widget"}}})
    assert templated.input_tokens > bare.input_tokens


def test_responses(client: openai.OpenAI, fake_openai: FakeOpenAI, support: str) -> None:
    use = {"id": support, "variables": {"product": "Widget"}}
    response = client.responses.create(model="chat", instructions="Be brief.", input="It does not start.",
                                       extra_body={"template": use})
    assert response.output_text == REPLY_TEXT
    sent = fake_openai.last_chat()["messages"]
    assert sent[:2] == [{"role": "system", "content": SYSTEM_V1}, {"role": "system", "content": "Be brief."}]
    assert json.dumps(sent).index("My product is Widget.") < json.dumps(sent).index("It does not start.")
    alone = client.responses.create(model="chat", extra_body={"template": use})  # no input: the template alone
    assert alone.status == "completed"
    assert [m["role"] for m in fake_openai.last_chat()["messages"]] == ["system", "user"]


# ------------------------------------------------------------------------------------------ batches and the CLI


def test_a_batch_line_uses_its_template(client: openai.OpenAI, fake_openai: FakeOpenAI, support: str) -> None:
    body = {"model": "chat", "template": {"id": support, "variables": {"product": "Batched"}}, "messages": QUESTION}
    file_id = upload(client, [line("with-template", body), line("unknown", {**body, "template": {"id": "nope"}})])
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT_URL, completion_window="24h")
    done = poll(client, batch.id)
    assert done.status == "completed", done
    results = {r["custom_id"]: r for r in [*lines_of(client, done.output_file_id),
                                           *lines_of(client, done.error_file_id)]}
    assert results["with-template"]["response"]["status_code"] == 200
    assert results["unknown"]["response"]["status_code"] == 404
    assert results["unknown"]["response"]["body"]["error"]["param"] == "template.id"
    assert any(seen.body["messages"][0] == {"role": "system", "content": "You support Batched. Answer in English."}
               for seen in fake_openai.chats() if isinstance(seen.body, dict) and seen.body.get("messages"))


def test_the_cli_manages_templates(app: Appliance, client: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    fields = {"messages": [{"role": "system", "content": "CLI says {{word}}."}], "variables": {"word": {}}}
    made = app.cli("templates", "create", "from-cli", input=json.dumps(fields))
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["version"] == 1
    toml = app.root / "v2.toml"
    toml.write_text('description = "second"\n[[messages]]\nrole = "system"\ncontent = "CLI v2 {{ word }}."\n'
                    "[variables.word]\ndefault = \"hi\"\n")
    added = app.cli("templates", "add-version", "from-cli", "--file", str(toml))
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["version"] == 2
    assert "from-cli  v2  second" in app.cli("templates", "list").stdout
    shown = json.loads(app.cli("templates", "show", "from-cli", "--version", "1").stdout)
    assert shown["messages"] == fields["messages"]
    assert [v["version"] for v in json.loads(app.cli("templates", "show", "from-cli", "--all").stdout)] == [1, 2]

    use = {"id": "from-cli", "version": 1, "variables": {"word": "yes"}}
    client.chat.completions.create(model="chat", messages=QUESTION, extra_body={"template": use})
    assert fake_openai.last_chat()["messages"][0]["content"] == "CLI says yes."

    undeclared = '{"messages": [{"role": "user", "content": "{{x}}"}]}'
    refused = app.cli("templates", "add-version", "from-cli", input=undeclared)
    assert refused.returncode == 1 and "x" in refused.stderr and "variables" in refused.stderr
    taken = app.cli("templates", "create", "from-cli", input=json.dumps(fields))
    assert taken.returncode == 1 and "exists" in taken.stderr
    assert app.cli("templates", "delete", "from-cli").returncode == 0
    assert app.cli("templates", "show", "from-cli").returncode == 1
    assert admin("GET", app, "/admin/templates/from-cli").status_code == 404


# ------------------------------------------------------------------------------------------ the real server


@pytest.mark.llamacpp
def test_llamacpp_sees_the_rendered_prompt(app: Appliance, llamacpp_url: str) -> None:
    """The real server counts the template's tokens: the same question costs more prompt tokens with it."""
    # String contents: llama-cpp-python's chat templates take no text-part lists. A user message too: SmolLM2's
    # chat template puts a default system message of its own where the request has none.
    new_template(app, "plain", messages=[
        {"role": "system", "content": "You support {{ product }}. Answer in {{language}}."},
        {"role": "user", "content": "My product is {{product}}, bought last week, and the manual is lost."}])

    def ready() -> None:
        assert app.get("/ready")[1]["backends"]["llamacpp"]["state"] == "ready"

    eventually(ready, timeout=30)
    use = {"template": {"id": "plain", "variables": {"product": "Widget"}}}
    llama = openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)
    bare = llama.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=4)
    templated = llama.chat.completions.with_raw_response.create(model="tiny-chat", messages=QUESTION, max_tokens=4,
                                                                extra_body=use)
    assert bare.usage is not None and templated.parse().usage is not None
    assert templated.parse().usage.prompt_tokens > bare.usage.prompt_tokens  # type: ignore[union-attr]
    row = logged(app, templated.headers["x-request-id"])
    assert (row["template"], row["backend"], row["status"]) == ("plain@1", "llamacpp", 200)
    chunks = list(llama.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=4, stream=True,
                                                stream_options={"include_usage": True}, extra_body=use))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None  # estimated: this server reports no usage in streams
    rows = rows_where(app, "template = ? AND backend = 'llamacpp'", ("plain@1",), count=2)
    assert [bool(row["stream"]) for row in rows] == [False, True]
