"""Keys with their own upstream credentials (BYOK), through real HTTP, the SDKs and the CLI, 2 workers.

The fakes record the headers each request reached them with: a BYOK key's requests carry its own secret,
every other key's the backend's configured one. The secrets must never show again: not in any admin answer,
the log, the access log, the journal or the database files.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes.anthropic_upstream import API_KEY as ANTHROPIC_SECRET
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.appliance import ADMIN_KEY, Appliance, toml
from tests.support.batches import line, poll, upload
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen  # the one-file build must carry PyNaCl

SECRET = "sk-byok-Qv7nW2xR9tLmK4pZ8sJd3hYc6fBg1aEu"
NEW_SECRET = "sk-byok-rotated-Hn5Tq8Wm2Zx7Kc4Vb9Lp3Rd6"
BACKEND_SECRET = "sk-backend-secret"
HELLO = [{"role": "user", "content": "hi"}]
KEY_FILE = "upstream-keys.key"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI,
        fake_anthropic: FakeAnthropic) -> Iterator[Appliance]:
    config = {
        "discovery": {"enabled": False},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "api_key": BACKEND_SECRET},
            # No key of its own: only keys that bring one can use it (its probe fails; requests still route).
            {"name": "anthropic", "type": "anthropic", "url": fake_anthropic.url, "discover": False,
             "models": ["claude-fake"]},
        ],
        "models": [{"name": "chat", "target": "fake/fake-chat"}],
        "cache": {"shared": True},
        "auth": {"cache_ttl_s": 0.2},
    }
    app = Appliance(tmp_path_factory.mktemp("byok"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def answers() -> list[str]:
    """Every admin API answer of the module, to search for secrets at the end."""
    return []


def admin(app: Appliance, answers: list[str], method: str, path: str, body: Any = None) -> httpx.Response:
    response = httpx.request(method, app.url + path, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=30)
    answers.append(response.text)
    return response


@pytest.fixture(scope="module")
def keys(app: Appliance, answers: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (id, secret): a key with its own credentials for both backends, and one without."""
    made = {}
    for name, upstream in (("byok", {"fake": SECRET, "anthropic": ANTHROPIC_SECRET}), ("plain", {})):
        response = admin(app, answers, "POST", "/admin/keys", {"name": name, "upstream_keys": upstream})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["upstream_keys"] == sorted(upstream)
        made[name] = (body["id"], body["key"])
    return made


def chat(app: Appliance, key: str, **extra: Any) -> httpx.Response:
    """One chat on a fresh connection (so requests spread over both workers)."""
    return httpx.post(app.url + "/v1/chat/completions", json={"model": "chat", "messages": HELLO, **extra},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)


def upstream_auth(fake: FakeOpenAI, response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return fake.find(response.headers["x-request-id"]).headers["Authorization"]


def arrives(change: Callable[[], bool]) -> None:
    """Key changes reach each worker within auth.cache_ttl_s: ask until they show."""
    def check() -> None:
        assert change()
    eventually(check)


# ------------------------------------------------------------------------------------------ use


def test_a_byok_key_sends_its_own_secret_and_other_keys_the_backends(app: Appliance, fake_openai: FakeOpenAI,
                                                                    keys: dict[str, tuple[str, str]]) -> None:
    with ThreadPoolExecutor(4) as pool:  # fresh connections: both workers open the key's credentials
        byok = list(pool.map(lambda _: chat(app, keys["byok"][1]), range(8)))
        plain = list(pool.map(lambda _: chat(app, keys["plain"][1]), range(8)))
    assert {upstream_auth(fake_openai, r) for r in byok} == {f"Bearer {SECRET}"}
    assert {upstream_auth(fake_openai, r) for r in plain} == {f"Bearer {BACKEND_SECRET}"}
    streamed = openai.OpenAI(base_url=app.url + "/v1", api_key=keys["byok"][1], max_retries=0)
    with streamed.chat.completions.with_streaming_response.create(model="chat", messages=HELLO,
                                                                  stream=True) as response:
        request_id = response.headers["x-request-id"]
        assert "".join(response.iter_lines())
    assert fake_openai.find(request_id).headers["Authorization"] == f"Bearer {SECRET}"


def test_every_surface_carries_it(app: Appliance, fake_openai: FakeOpenAI,
                                  keys: dict[str, tuple[str, str]]) -> None:
    key = keys["byok"][1]
    messages = anthropic.Anthropic(base_url=app.url, api_key=key, max_retries=0)
    reply = messages.messages.with_raw_response.create(model="chat", max_tokens=16, messages=HELLO)
    assert fake_openai.find(reply.headers["x-request-id"]).headers["Authorization"] == f"Bearer {SECRET}"
    responses = openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0)
    answer = responses.responses.with_raw_response.create(model="chat", input="hi")
    assert fake_openai.find(answer.headers["x-request-id"]).headers["Authorization"] == f"Bearer {SECRET}"
    embedded = responses.embeddings.with_raw_response.create(model="fake/fake-embed", input="hi")
    assert fake_openai.find(embedded.headers["x-request-id"]).headers["Authorization"] == f"Bearer {SECRET}"


def test_an_anthropic_backend_gets_it_as_x_api_key_and_no_key_falls_back(app: Appliance,
                                                                        fake_anthropic: FakeAnthropic,
                                                                        keys: dict[str, tuple[str, str]]) -> None:
    own = anthropic.Anthropic(base_url=app.url, api_key=keys["byok"][1], max_retries=0)
    message = own.messages.create(model="claude-fake", max_tokens=16, messages=HELLO)
    assert message.content
    count = own.messages.count_tokens(model="claude-fake", messages=HELLO)
    assert count.input_tokens > 0
    calls = fake_anthropic.seen("/v1/messages") + fake_anthropic.seen("/v1/messages/count_tokens")
    assert len(calls) == 2 and {seen.headers.get("x-api-key") for seen in calls} == {ANTHROPIC_SECRET}
    # The plain key has none and the backend none either: the fake refuses, as Anthropic would, and the client
    # learns that the gateway's credentials were refused (not its own key: a 5xx, not a 401).
    plain = anthropic.Anthropic(base_url=app.url, api_key=keys["plain"][1], max_retries=0)
    with pytest.raises(anthropic.InternalServerError, match="refused the gateway's credentials"):
        plain.messages.create(model="claude-fake", max_tokens=16, messages=HELLO)
    assert fake_anthropic.last().headers.get("x-api-key") is None


def test_a_batch_runs_with_its_creators_credentials(app: Appliance, fake_openai: FakeOpenAI,
                                                    keys: dict[str, tuple[str, str]]) -> None:
    client = openai.OpenAI(base_url=app.url + "/v1", api_key=keys["byok"][1], max_retries=0)
    file_id = upload(client, [line(str(i), {"model": "chat", "messages": HELLO}) for i in range(3)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert poll(client, batch.id).status == "completed"
    lines = [seen for seen in fake_openai.chats() if seen.headers.get("X-Appliance-Batch") == batch.id]
    assert len(lines) == 3 and {seen.headers["Authorization"] for seen in lines} == {f"Bearer {SECRET}"}


def test_a_proxy_call_carries_the_keys_own_secret(app: Appliance, answers: list[str],
                                                  fake_openai: FakeOpenAI) -> None:
    made = admin(app, answers, "POST", "/admin/keys", {"name": "byok-proxy", "endpoints": ["/proxy/fake/*"],
                                                        "upstream_keys": {"fake": SECRET}}).json()
    response = httpx.post(app.url + "/proxy/fake/v1/completions", json={"model": "fake-chat", "prompt": "hi"},
                          headers={"Authorization": f"Bearer {made['key']}"}, timeout=30)
    assert upstream_auth(fake_openai, response) == f"Bearer {SECRET}"
    admin_call = httpx.post(app.url + "/proxy/fake/v1/completions", json={"model": "fake-chat", "prompt": "hi"},
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert upstream_auth(fake_openai, admin_call) == f"Bearer {BACKEND_SECRET}"


def test_a_shared_cache_never_crosses_a_byok_key(app: Appliance, fake_openai: FakeOpenAI,
                                                 keys: dict[str, tuple[str, str]]) -> None:
    question = {"temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}
    assert chat(app, keys["plain"][1], **question).headers["x-cache"] == "MISS"
    assert chat(app, keys["plain"][1], **question).headers["x-cache"] == "HIT"  # [cache] shared
    first = chat(app, keys["byok"][1], **question)
    assert first.headers["x-cache"] == "MISS" and upstream_auth(fake_openai, first) == f"Bearer {SECRET}"
    assert chat(app, keys["byok"][1], **question).headers["x-cache"] == "HIT"  # its own entry


# ------------------------------------------------------------------------------------------ management


def test_bad_names_and_secrets_are_400_naming_the_field(app: Appliance, answers: list[str],
                                                        keys: dict[str, tuple[str, str]]) -> None:
    key_id = keys["plain"][0]
    for body, param in (({"upstream_keys": {"nope": "sk-x"}}, "upstream_keys.nope"),
                        ({"upstream_keys": {"fake": "has space"}}, "upstream_keys.fake"),
                        ({"upstream_keys": ["fake"]}, "upstream_keys")):
        response = admin(app, answers, "PATCH", f"/admin/keys/{key_id}", body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    response = admin(app, answers, "POST", "/admin/keys", {"name": "x", "upstream_keys": {"nope": SECRET}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "upstream_keys.nope"


def test_patch_replaces_and_removes_and_rotation_keeps(app: Appliance, answers: list[str], fake_openai: FakeOpenAI,
                                                      keys: dict[str, tuple[str, str]]) -> None:
    response = admin(app, answers, "POST", "/admin/keys", {"name": "changing", "upstream_keys": {"fake": SECRET}})
    key_id, key = response.json()["id"], response.json()["key"]
    response = admin(app, answers, "PATCH", f"/admin/keys/{key_id}", {"upstream_keys": {"fake": NEW_SECRET}})
    assert response.status_code == 200 and response.json()["upstream_keys"] == ["fake"]
    arrives(lambda: upstream_auth(fake_openai, chat(app, key)) == f"Bearer {NEW_SECRET}")
    rotated = admin(app, answers, "POST", f"/admin/keys/{key_id}/rotate").json()
    assert rotated["upstream_keys"] == ["fake"]
    arrives(lambda: chat(app, rotated["key"]).status_code == 200)
    assert upstream_auth(fake_openai, chat(app, rotated["key"])) == f"Bearer {NEW_SECRET}"
    response = admin(app, answers, "PATCH", f"/admin/keys/{key_id}", {"upstream_keys": {"fake": None}})
    assert response.json()["upstream_keys"] == []
    arrives(lambda: upstream_auth(fake_openai, chat(app, rotated["key"])) == f"Bearer {BACKEND_SECRET}")


def test_the_cli_reads_secrets_from_stdin_and_shows_only_names(app: Appliance, fake_openai: FakeOpenAI) -> None:
    done = app.cli("keys", "create", "--name", "cli-byok", "--upstream-key", "fake", input=SECRET + "\n")
    assert done.returncode == 0, done.stderr
    key = next(part.split()[-1] for part in done.stdout.splitlines() if part.startswith("key:"))
    key_id = next(part.split()[-1] for part in done.stdout.splitlines() if part.startswith("id:"))
    arrives(lambda: chat(app, key).status_code == 200)
    assert upstream_auth(fake_openai, chat(app, key)) == f"Bearer {SECRET}"
    shown = app.cli("keys", "show", key_id)
    assert '"upstream_keys": [\n    "fake"\n  ]' in shown.stdout
    listed = app.cli("keys", "list")
    assert SECRET not in done.stdout + shown.stdout + listed.stdout + done.stderr
    refused = app.cli("keys", "update", key_id, "--upstream-key", "nope", input="sk-x\n")
    assert refused.returncode == 1 and "unknown backend 'nope'" in refused.stderr
    missing = app.cli("keys", "update", key_id, "--upstream-key", "fake", input="")
    assert missing.returncode == 1 and "no key on standard input" in missing.stderr
    removed = app.cli("keys", "update", key_id, "--remove-upstream-key", "fake")
    assert removed.returncode == 0 and '"upstream_keys": []' in removed.stdout


def test_a_reload_keeps_them_by_backend_name(app: Appliance, fake_openai: FakeOpenAI,
                                             keys: dict[str, tuple[str, str]]) -> None:
    backends = [dict(backend) for backend in app.config["backends"]]
    backends[0]["api_key"] = "sk-backend-after-reload"  # the backend changes; the key's own secret stays
    app.config_path.write_text(toml({**app.config, "backends": backends}))
    status, body, _ = app.post("/admin/reload", b"")
    assert status == 200 and body["reloaded"] is True and body["workers_behind"] == [], body
    assert upstream_auth(fake_openai, chat(app, keys["byok"][1])) == f"Bearer {SECRET}"
    assert upstream_auth(fake_openai, chat(app, keys["plain"][1])) == "Bearer sk-backend-after-reload"


# ------------------------------------------------------------------------------------------ never shown again


def test_the_secrets_show_in_no_answer_log_or_file(app: Appliance, answers: list[str],
                                                   keys: dict[str, tuple[str, str]]) -> None:
    """Last in the module: every answer so far, then the log and every file of the data dir, stopped."""
    key_id = keys["byok"][0]
    for path in ("/admin/keys", f"/admin/keys/{key_id}", "/admin/requests?limit=1000", "/admin/usage?group_by=key"):
        assert admin(app, answers, "GET", path).status_code == 200
    own = httpx.get(app.url + "/v1/key", headers={"Authorization": f"Bearer {keys['byok'][1]}"})
    assert own.json()["upstream_keys"] == ["anthropic", "fake"]
    answers.append(own.text)
    shown = "\n".join(answers)
    for secret in (SECRET, NEW_SECRET, ANTHROPIC_SECRET):
        assert secret not in shown
    key_file = app.data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    while_running = _contents(app.data_dir)
    assert {"appliance.db", "appliance.db-wal", "appliance.db-shm"} <= {path.name for path in while_running}
    assert any(path.parent.name == "journal" for path in while_running)
    assert app.stop() == 0
    stopped = _contents(app.data_dir)
    for path, data in [*while_running.items(), *stopped.items(), (app.log_path, app.log_path.read_bytes())]:
        for secret in (SECRET, NEW_SECRET, ANTHROPIC_SECRET):
            assert secret.encode() not in data, f"{secret} in {path}"
    assert '"path":"/v1/chat/completions"' in app.log()  # the access log was on, and went to that log


def _contents(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` (the database, its -wal and -shm, the journal...) as it is now."""
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
