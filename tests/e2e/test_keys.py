"""Keys, roles, limits, budgets and the ledger, through real HTTP and the openai SDK, 2 workers.

One private appliance serves the module (its own data dir, so key counts and ledger rows are ours). The
limit tests fire bursts on fresh connections so both workers take requests: a per-worker count would let
twice the limit through.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.batches import line, poll, upload

pytestmark = pytest.mark.frozen

PRICED = {"name": "priced", "target": "fake/fake-chat", "input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000}
FREE_MODEL = "fake/org/fake-slash"  # unpriced: costs $0
REQUEST = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any, fake_ollama: Any,
        llamacpp_port: int) -> Iterator[Appliance]:
    config = base_config(fake_openai, fake_ollama, llamacpp_port)
    config["models"] = [*config["models"], PRICED, {"name": "fake/fake-slow-5", "rpm": 3}]
    app = Appliance(tmp_path_factory.mktemp("keys"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


def new_key(app: Appliance, **fields: Any) -> tuple[str, str]:
    """(id, secret) of a fresh key made through the admin API."""
    status, body, _ = app.post("/admin/keys", {"name": "test", **fields})
    assert status == 201, body
    return body["id"], body["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(app: Appliance, key: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
    """One chat completion on a fresh connection (so a burst spreads over both workers)."""
    return httpx.post(app.url + "/v1/chat/completions", json=body or REQUEST, headers={**bearer(key), **headers},
                      timeout=30)


def burst(app: Appliance, key: str, n: int, body: dict[str, Any] | None = None) -> list[httpx.Response]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: chat(app, key, body), range(n)))


# ------------------------------------------------------------------------------------------ auth


def test_requests_without_a_valid_key_get_401_and_public_paths_stay_open(app: Appliance) -> None:
    for headers in ({}, bearer("sk-app-not-a-real-key-000000000000"), {"Authorization": "Basic abc"}):
        response = httpx.get(app.url + "/v1/models", headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert error["request_id"] == response.headers["x-request-id"]
    for path in ("/health", "/healthz", "/ready", "/", "/status"):
        assert httpx.get(app.url + path).status_code == 200, path
    assert httpx.get(app.url + "/statsz").status_code != 401  # loopback callers need no key
    # x-api-key works as well as Authorization: Bearer
    assert httpx.get(app.url + "/v1/models", headers={"x-api-key": ADMIN_KEY}).status_code == 200


def test_roles_endpoints_and_models(app: Appliance) -> None:
    _, user = new_key(app, role="user", models=["fake-chat", "fake/fake-embed"])
    _, reader = new_key(app, role="read-only")
    _, embed_only = new_key(app, endpoints=["/v1/embeddings", "/v1/models*"])

    # user: its models only, never /admin
    assert chat(app, user).status_code == 200  # "chat" is an alias served by fake-chat
    refused = chat(app, user, {**REQUEST, "model": "fake/fake-tools"})
    assert refused.status_code == 403
    assert refused.json()["error"] | {"message": ""} == {
        "message": "", "type": "permission_error", "code": "model_not_allowed", "param": "model",
        "request_id": refused.headers["x-request-id"]}
    assert "fake/fake-tools" in refused.json()["error"]["message"]
    listed = httpx.get(app.url + "/v1/models", headers=bearer(user)).json()["data"]
    # the aliases "chat" and "priced" lead to fake/fake-chat, so the key may use them (and sees them)
    assert {m["id"] for m in listed} == {"fake-chat", "fake-embed", "chat", "priced"}
    assert httpx.get(app.url + "/admin/keys", headers=bearer(user)).json()["error"]["code"] == \
        "endpoint_not_allowed"

    # read-only: GET only
    assert httpx.get(app.url + "/v1/models", headers=bearer(reader)).status_code == 200
    refused = chat(app, reader)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "endpoint_not_allowed"
    assert "POST /v1/chat/completions" in refused.json()["error"]["message"]

    # endpoint patterns
    assert chat(app, embed_only).status_code == 403
    embedded = httpx.post(app.url + "/v1/embeddings", json={"model": "fake/fake-embed", "input": "x"},
                          headers=bearer(embed_only))
    assert embedded.status_code == 200

    # admin: everything
    assert httpx.get(app.url + "/admin/keys", headers=bearer(ADMIN_KEY)).status_code == 200


# A key's model patterns against the names a client may write: which ones it may use (one rule everywhere).
MODEL_NAMES = ("fake-embed", "fake/fake-embed", "fake-chat", "fake/fake-chat", "chat", "priced", "fake-tools")
MAY_USE = {
    ("fake/fake-embed",): {"fake-embed", "fake/fake-embed"},  # backend/model: the model under any name
    ("fake-chat",): {"fake-chat", "fake/fake-chat", "chat", "priced"},  # the served model: its aliases too
    ("chat",): {"chat"},  # an alias: that alias only
    ("fake-e*",): {"fake-embed", "fake/fake-embed"},
}


def _allowed(response: httpx.Response) -> bool:
    assert response.status_code in (200, 403), response.text
    if response.status_code == 403:  # Messages answers in Anthropic's shape: no code there
        error = response.json()["error"]
        assert error.get("code", "model_not_allowed") == "model_not_allowed", response.text
        assert "may not use the model" in error["message"], response.text
    return response.status_code == 200


def _surfaces(app: Appliance, key: str, model: str) -> dict[str, bool]:
    """May ``key`` use ``model``, as each endpoint answers it."""
    hi = [{"role": "user", "content": "hi"}]
    calls = {
        "chat": ("POST", "/v1/chat/completions", {"model": model, "messages": hi}),
        "chat stream": ("POST", "/v1/chat/completions", {"model": model, "messages": hi, "stream": True}),
        "embeddings": ("POST", "/v1/embeddings", {"model": model, "input": "hi"}),
        "messages": ("POST", "/v1/messages", {"model": model, "max_tokens": 16, "messages": hi}),
        "responses": ("POST", "/v1/responses", {"model": model, "input": "hi", "store": False}),
        "retrieve": ("GET", f"/v1/models/{model}", None),
    }
    return {name: _allowed(httpx.request(method, app.url + path, json=body, headers=bearer(key), timeout=30))
            for name, (method, path, body) in calls.items()}


@pytest.mark.parametrize("patterns", list(MAY_USE), ids=lambda p: ",".join(p))
def test_one_model_rule_for_every_endpoint_and_the_list(app: Appliance, patterns: tuple[str, ...]) -> None:
    _, key = new_key(app, models=list(patterns))
    expected = MAY_USE[patterns]
    for model in MODEL_NAMES:
        answers = _surfaces(app, key, model)
        assert answers == dict.fromkeys(answers, model in expected), model
    listed = {m["id"] for m in httpx.get(app.url + "/v1/models", headers=bearer(key)).json()["data"]}
    assert listed == {name for name in expected if "/" not in name}  # backend/model is accepted, not listed


def test_a_batch_follows_the_same_model_rule(app: Appliance) -> None:
    _, key = new_key(app, models=["fake/fake-embed"])
    sdk = openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=0)
    outcome = {}
    for url, model, body in (("/v1/embeddings", "fake-embed", {"input": "hi"}),
                             ("/v1/chat/completions", "fake-chat", {"messages": [{"role": "user", "content": "x"}]})):
        file_id = upload(sdk, [line("1", {"model": model, **body}, url)])
        batch = sdk.batches.create(input_file_id=file_id, endpoint=url, completion_window="24h")
        outcome[model] = poll(sdk, batch.id)
    assert outcome["fake-embed"].status == "completed" and outcome["fake-embed"].request_counts.completed == 1
    assert outcome["fake-chat"].status == "failed"
    assert outcome["fake-chat"].errors.data[0].code == "model_not_found"


def test_an_unknown_model_lists_only_what_the_key_may_use(app: Appliance) -> None:
    _, key = new_key(app, models=["fake-e*"])
    for response in (chat(app, key, {**REQUEST, "model": "gpt-99"}),
                     httpx.get(app.url + "/v1/models/gpt-99", headers=bearer(key))):
        assert response.status_code == 404
        message = response.json()["error"]["message"]
        assert message.endswith("Known models: fake-embed."), message
    _, nothing = new_key(app, models=["no-such-*"])
    message = chat(app, nothing, {**REQUEST, "model": "gpt-99"}).json()["error"]["message"]
    assert "Known models" not in message and "fake" not in message, message
    everything = chat(app, ADMIN_KEY, {**REQUEST, "model": "gpt-99"}).json()["error"]["message"]
    assert "chat" in everything and "fake-chat" in everything


def test_expired_key_is_refused_like_an_unknown_one(app: Appliance) -> None:
    _, key = new_key(app, expires_at=time.time() + 1.5)
    assert chat(app, key).status_code == 200
    time.sleep(1.6)
    response = chat(app, key)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == chat(app, "sk-app-unknown-00000000000000000").json()[
        "error"]["message"]


def test_keys_made_by_the_cli_work_and_revoking_reaches_both_workers(app: Appliance) -> None:
    made = app.cli("keys", "create", "--name", "cli-made", "--role", "user", "--models", "fake*,chat",
                   "--rpm", "1000")
    assert made.returncode == 0, made.stderr
    key = re.search(r"key:\s+(sk-app-\S+)", made.stdout).group(1)
    key_id = re.search(r"id:\s+(key_\w+)", made.stdout).group(1)
    assert all(r.status_code == 200 for r in burst(app, key, 8))  # both workers now hold it in their cache
    listed = app.cli("keys", "list", "--json")
    assert key_id in listed.stdout and key not in listed.stdout  # the secret is never shown again

    disabled_at = time.monotonic()
    assert app.cli("keys", "disable", key_id).returncode == 0
    refused_in_a_row = 0
    while refused_in_a_row < 10:  # ten fresh connections in a row refused: every worker has seen it
        assert time.monotonic() - disabled_at < 15, "revocation not seen by every worker in time"
        refused_in_a_row = refused_in_a_row + 1 if chat(app, key).status_code == 401 else 0
    assert app.cli("keys", "enable", key_id).returncode == 0
    rotated = app.cli("keys", "rotate", key_id)
    new_secret = re.search(r"key:\s+(sk-app-\S+)", rotated.stdout).group(1)
    deadline = time.monotonic() + 15
    while chat(app, new_secret).status_code != 200:
        assert time.monotonic() < deadline
    assert app.cli("keys", "delete", key_id).returncode == 0
    assert app.cli("keys", "show", key_id).returncode == 1


def test_admin_api_manages_keys(app: Appliance) -> None:
    key_id, secret = new_key(app, role="user", rpm=5, metadata={"team": "a"})
    status, body, _ = app.get(f"/admin/keys/{key_id}")
    assert status == 200 and body["metadata"] == {"team": "a"} and body["prefix"] == secret[:13]
    assert "hash" not in body and "key" not in body
    patch = httpx.patch(app.url + f"/admin/keys/{key_id}", json={"rpm": 7}, headers=bearer(ADMIN_KEY))
    assert patch.status_code == 200 and patch.json()["rpm"] == 7
    bad = httpx.patch(app.url + f"/admin/keys/{key_id}", json={"role": "root"}, headers=bearer(ADMIN_KEY))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"
    bad = app.post("/admin/keys", {"name": "x", "budget_usd": 3})
    assert bad[0] == 400 and bad[1]["error"]["param"] == "budget_period"
    status, rotated, _ = app.post(f"/admin/keys/{key_id}/rotate", b"")
    assert status == 200 and rotated["key"] != secret
    assert httpx.delete(app.url + f"/admin/keys/{key_id}", headers=bearer(ADMIN_KEY)).json()["deleted"] is True
    assert app.get(f"/admin/keys/{key_id}")[0] == 404


# ------------------------------------------------------------------------------------------ limits


def test_rpm_is_exact_across_both_workers(app: Appliance) -> None:
    _, key = new_key(app, rpm=10)
    responses = burst(app, key, 24)
    passed = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(passed) == 10 and len(limited) == 14
    error = limited[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert int(limited[0].headers["retry-after"]) >= 1 and error["retry_after"] >= 1
    last = min(passed, key=lambda r: int(r.headers["x-ratelimit-remaining-requests"]))
    assert last.headers["x-ratelimit-limit-requests"] == "10"
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+(\.\d+)?(ms|s)|\d+m\d+s", last.headers["x-ratelimit-reset-requests"])


def test_model_rpm_binds_every_key(app: Appliance) -> None:
    _, one = new_key(app)
    _, two = new_key(app)
    body = {**REQUEST, "model": "fake/fake-slow-5"}  # no other test uses this model
    codes = [chat(app, k, body).status_code for k in (one, two, one, two, one)]
    assert codes == [200, 200, 200, 429, 429]


def test_tpm_counts_the_estimate_then_the_real_usage(app: Appliance) -> None:
    # The fake reports 16 tokens per answer; the prompt estimate is ~9: 16 + 9 fits 30, 32 + 9 does not.
    _, key = new_key(app, tpm=30)
    codes = [chat(app, key).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert chat(app, key).headers["x-ratelimit-limit-tokens"] == "30"


def test_max_concurrent_counts_requests_in_flight_on_both_workers(app: Appliance) -> None:
    _, key = new_key(app, max_concurrent=2)
    slow = {**REQUEST, "model": "fake/fake-slow-1500"}
    responses = burst(app, key, 4, slow)
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
    assert chat(app, key).status_code == 200  # released once they finished


def test_budget_is_spent_then_refused_without_retry_but_free_models_still_pass(app: Appliance) -> None:
    # "priced" costs 11 * $1 + 5 * $2 = $21 per answer (the fake's usage); the budget ($45) holds two:
    # a third would reach $42 + its ~$8 prompt estimate.
    _, key = new_key(app, budget_usd=45, budget_period="day")
    sdk = openai.OpenAI(base_url=app.url + "/v1", api_key=key, max_retries=3)
    first = sdk.chat.completions.with_raw_response.create(model="priced", messages=REQUEST["messages"])
    assert first.headers["x-appliance-cost-usd"] == "21.000000000"
    usage = first.parse().usage.model_dump()
    assert usage["total_cost_usd"] == 21 and usage["input_cost_usd"] == 11 and usage["output_cost_usd"] == 10
    assert usage["latency_ms"] > 0 and usage["ttft_ms"] > 0
    sdk.chat.completions.create(model="priced", messages=REQUEST["messages"])
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(model="priced", messages=REQUEST["messages"])
    assert time.monotonic() - started < 1.5  # not retried: x-should-retry: false
    assert info.value.code == "budget_exceeded"
    assert info.value.response.headers["x-should-retry"] == "false"
    # A $0 model never consumes or is blocked by a USD budget.
    free = sdk.chat.completions.create(model=FREE_MODEL, messages=REQUEST["messages"])
    assert free.usage.model_dump()["total_cost_usd"] == 0
    # Streams carry the cost in the final usage chunk when asked.
    stream = sdk.chat.completions.create(model=FREE_MODEL, messages=REQUEST["messages"], stream=True,
                                         stream_options={"include_usage": True})
    last = list(stream)[-1].usage.model_dump()
    assert last["total_cost_usd"] == 0 and last["ttft_ms"] > 0 and last["latency_ms"] >= last["ttft_ms"]

    mine = httpx.get(app.url + "/v1/key", headers=bearer(key)).json()
    assert mine["role"] == "user" and mine["budget_usd"] == 45
    assert mine["state"]["spent_usd"] == 42 and mine["state"]["remaining_usd"] == 3
    assert mine["state"]["period"] == "day"


def test_own_key_view(app: Appliance) -> None:
    key_id, key = new_key(app, rpm=100, tpm=100_000)
    assert chat(app, key).status_code == 200
    time.sleep(0.6)  # two flush intervals: the ledger row is written
    mine = httpx.get(app.url + "/v1/key", headers=bearer(key)).json()
    assert mine["id"] == key_id and mine["limits"]["rpm"] == 100 and "hash" not in mine
    assert mine["usage"]["recent"][0]["status"] == 200
    assert mine["usage"]["today"]["requests"] == 1


# ------------------------------------------------------------------------------------------ ledger


def test_ledger_rows_equal_requests_served_also_after_sigterm(app: Appliance, tmp_path: Any,
                                                             fake_openai: Any, fake_ollama: Any,
                                                             llamacpp_port: int) -> None:
    own = Appliance(tmp_path / "ledger", base_config(fake_openai, fake_ollama, llamacpp_port))
    own.start()
    try:
        _, body, _ = own.post("/admin/keys", {"name": "burst"})
        key_id, key = body["id"], body["key"]
        responses = burst(own, key, 60) + burst(own, key, 20, {**REQUEST, "stream": True})
        assert all(r.status_code == 200 for r in responses)
        time.sleep(0.6)
        usage = httpx.get(own.url + f"/admin/usage?key={key_id}&group_by=key", headers=bearer(ADMIN_KEY)).json()
        assert usage["data"][0]["requests"] == 80
        assert usage["data"][0]["prompt_tokens"] == 80 * 11
        responses = burst(own, key, 40)  # then stop right away: the buffered rows must still land
    finally:
        assert own.stop() == 0
    with sqlite3.connect(own.data_dir / "appliance.db") as db:
        rows = db.execute("SELECT count(*) FROM requests WHERE key_id = ?", (key_id,)).fetchone()[0]
        rolled = db.execute("SELECT sum(requests) FROM usage_daily WHERE key_id = ?", (key_id,)).fetchone()[0]
    assert rows == rolled == 120


def test_backup_while_serving(app: Appliance, tmp_path: Any) -> None:
    target = tmp_path / "copy.db"
    done = app.cli("backup", str(target))
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(target) as db:
        assert db.execute("SELECT count(*) FROM api_keys").fetchone()[0] >= 1
    assert app.cli("backup", str(target)).returncode == 1  # never overwrites


def test_first_start_prints_an_admin_key_once(tmp_path: Any) -> None:
    config = {"discovery": {"enabled": False}}
    first = Appliance(tmp_path / "fresh", config, workers=1, env={"APPLIANCE_ADMIN_KEY": ""})
    first.start()
    try:
        key = re.search(r"(sk-app-[\w-]{43})", first.log()).group(1)
        assert httpx.get(first.url + "/v1/models", headers=bearer(key)).status_code == 200
    finally:
        first.stop()
    first.start()
    try:
        assert first.log().count("sk-app-") == 1
    finally:
        first.stop()
