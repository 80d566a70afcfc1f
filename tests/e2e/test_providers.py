"""GET /v1/providers through a real appliance (2 workers): one model on two backends under a least_busy alias,
one of them priced; latency and TTFT from real requests; the first choice moving with the load and with an
open breaker; a key restricted to one model."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.polling import eventually

pytestmark = pytest.mark.frozen

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
EAST_PRICE = {"input_per_mtok": 0.5, "output_per_mtok": 2.0, "cached_input_per_mtok": 0.5}
FAILURES = 3  # routing.breaker_failures


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, fake_openai: Any) -> Iterator[Appliance]:
    config = {
        "discovery": {"enabled": False, "interval_s": 300},
        "backends": [{"name": name, "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]}
                     for name in ("west", "east")],
        "models": [{"name": "duo", "targets": ["west/fake-chat", "east/fake-chat"], "strategy": "least_busy"},
                   {"name": "east/fake-chat", "input_per_mtok": 0.5, "output_per_mtok": 2.0}],
        # No retry, no cache (a hit is no backend's latency), a breaker that stays open once it opens.
        "routing": {"retries": 0, "breaker_failures": FAILURES, "breaker_min_requests": 1000,
                    "breaker_cooldown_s": 600, "probe_interval_s": 300},
        "cache": {"enabled": False},
    }
    app = Appliance(tmp_path_factory.mktemp("providers"), config)
    app.start()
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def client(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def components(app: Appliance) -> dict[str, Any]:
    return httpx.get(app.url + "/openapi.json", timeout=10).json()["components"]


def providers(app: Appliance, model: str | None = None, key: str = ADMIN_KEY) -> httpx.Response:
    """On a fresh connection, so either worker answers."""
    return httpx.get(app.url + "/v1/providers", params={"model": model} if model is not None else None,
                     headers={"Authorization": f"Bearer {key}"}, timeout=10)


def conforms(components: dict[str, Any], answer: Any, schema: str = "ProviderList") -> None:
    """As the appliance's own /openapi.json describes it."""
    validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": components})
    validator.validate(answer)


def by_backend(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["backend"]: entry for entry in answer["data"]}


def test_every_backend_with_its_models_health_and_load(app: Appliance, components: dict[str, Any]) -> None:
    def listed() -> dict[str, Any]:
        response = providers(app)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert all(entry["up"] is True for entry in answer["data"]), answer
        return answer

    answer = eventually(listed)
    conforms(components, answer)
    assert {k: answer[k] for k in ("object", "model", "route", "strategy", "window_s")} == {
        "object": "list", "model": None, "route": None, "strategy": None, "window_s": 300}
    assert list(by_backend(answer)) == ["west", "east"]
    for entry in answer["data"]:
        assert entry["object"] == "provider" and entry["kind"] == "openai" and entry["state"] == "ready"
        assert entry["models"] == ["fake-chat"] and entry["in_flight"] == 0 and entry["available"] is True
        assert entry["breaker"] == {"state": "closed", "consecutive_failures": 0, "retry_after_s": 0.0}
        assert entry["latency_ms"] is None and entry["ttft_ms"] is None  # nothing asked yet
        assert "first_choice" not in entry
    head = httpx.head(app.url + "/v1/providers", headers=AUTH)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


def test_latency_ttft_and_prices_per_backend_and_the_first_choice(app: Appliance, client: openai.OpenAI,
                                                                 components: dict[str, Any]) -> None:
    for backend in ("west", "east"):
        for _ in range(3):
            client.chat.completions.create(model=f"{backend}/fake-chat", messages=MESSAGES)
        for _ in range(2):
            for _chunk in client.chat.completions.create(model=f"{backend}/fake-chat", messages=MESSAGES,
                                                         stream=True):
                pass

    def sampled() -> dict[str, Any]:
        answer = providers(app, "duo").json()
        assert all((entry["latency_ms"] or {}).get("samples") == 5 for entry in answer["data"]), answer
        return answer

    answer = eventually(sampled)
    conforms(components, answer)
    conforms(components, providers(app).json())  # with timings now
    assert {k: answer[k] for k in ("object", "model", "route", "strategy", "window_s")} == {
        "object": "list", "model": "duo", "route": "duo", "strategy": "least_busy", "window_s": 300}
    west, east = answer["data"]  # config order
    assert (west["backend"], west["model"], east["backend"], east["model"]) == ("west", "fake-chat", "east",
                                                                                "fake-chat")
    for entry in (west, east):
        latency, ttft = entry["latency_ms"], entry["ttft_ms"]
        assert 0 < latency["p50"] <= latency["p95"]
        assert ttft["samples"] == 2 and 0 < ttft["p50"] <= ttft["p95"]  # the streams only
        assert entry["in_flight"] == 0 and entry["model_in_flight"] == 0
    assert east["price"] == EAST_PRICE and west["price"] is None  # unpriced
    # Idle and closed: least_busy keeps config order.
    assert (west["first_choice"], west["rank"], east["first_choice"], east["rank"]) == (True, 1, False, 2)


def test_the_first_choice_moves_to_the_idle_backend_while_the_other_is_busy(app: Appliance) -> None:
    # A request held open at the backend (it waits a minute) until this test hangs up on it.
    body = json.dumps({"model": "west/fake-chat", "messages": MESSAGES, "fake_delay_ms": 60_000}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", app.port)) as held:
        held.sendall(head + body)

        def busy() -> dict[str, dict[str, Any]]:
            entries = by_backend(providers(app, "duo").json())
            assert entries["west"]["model_in_flight"] == 1, entries
            return entries

        entries = eventually(busy)
        assert entries["west"]["in_flight"] == 1 and entries["east"]["in_flight"] == 0
        assert entries["east"]["first_choice"] is True and entries["east"]["rank"] == 1
        assert entries["west"]["first_choice"] is False and entries["west"]["rank"] == 2

    def idle() -> None:  # hung up: the gateway drops the upstream call, and the count with it
        entries = by_backend(providers(app, "duo").json())
        assert entries["west"]["in_flight"] == 0 and entries["west"]["first_choice"] is True, entries

    eventually(idle)


def test_the_first_choice_flips_when_a_breaker_opens(app: Appliance, components: dict[str, Any]) -> None:
    for _ in range(FAILURES):
        failed = httpx.post(app.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                            json={"model": "west/fake-chat", "messages": MESSAGES, "fake_status": 500})
        assert failed.status_code == 500
    answer = providers(app, "duo").json()  # breakers are shared: every worker sees it at once
    conforms(components, answer)
    entries = by_backend(answer)
    west, east = entries["west"], entries["east"]
    assert west["breaker"]["state"] == "open" and west["breaker"]["consecutive_failures"] == FAILURES
    assert west["available"] is False and west["breaker"]["retry_after_s"] > 0
    assert west["first_choice"] is False and west["rank"] == 1  # still first in the strategy's order, but skipped
    assert east["first_choice"] is True and east["available"] is True
    listed = by_backend(providers(app).json())
    assert listed["west"]["breaker"]["state"] == "open" and listed["east"]["breaker"]["state"] == "closed"
    answered = httpx.post(app.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={"model": "duo", "messages": MESSAGES})
    assert answered.headers["x-appliance-backend"] == "east"  # where the catalog said it would go


def test_a_key_restricted_to_one_model_sees_only_its_backends(app: Appliance, components: dict[str, Any]) -> None:
    status, body, _ = app.post("/admin/keys", {"name": "east only", "models": ["east/fake-chat"]})
    assert status == 201, body
    key = body["key"]
    listed = providers(app, key=key).json()
    assert [(e["backend"], e["models"]) for e in listed["data"]] == [("east", ["fake-chat"])]
    duo = providers(app, "duo", key=key).json()  # the alias, narrowed to the target the key may take
    assert [(e["backend"], e["first_choice"], e["price"]) for e in duo["data"]] == [("east", True, EAST_PRICE)]
    refused = providers(app, "west/fake-chat", key=key)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    unknown = providers(app, "no-such-model", key=key)
    error = unknown.json()["error"]
    assert unknown.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "west" not in error["message"] and error["request_id"] == unknown.headers["x-request-id"]
    for answer in (refused, unknown):
        conforms(components, answer.json(), "ApplianceErrorResponse")


def test_bad_requests_are_the_clients_errors(app: Appliance) -> None:
    blank = providers(app, "")
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "model"
    assert httpx.get(app.url + "/v1/providers", timeout=10).status_code == 401
