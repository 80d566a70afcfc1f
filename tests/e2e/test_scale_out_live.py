"""Two appliances sharing one Redis ([state] url), each with its own SQLite data dir and 2 workers: a cache
entry written via A is a HIT on B, a breaker A's failures open is open on B (and closes on both after a good
trial), a Responses conversation started on A continues on B (HTTP and WebSocket); with Redis killed requests
keep flowing (cache misses, local breakers) and sharing comes back with it.

The module starts its own Redis: its last test kills it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets.sync.client

from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.engines import Engine, redis_binary, start_redis
from tests.support.polling import eventually

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
COOLDOWN_S = 1.0

pytestmark = pytest.mark.skipif(redis_binary() is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = start_redis(tmp_path_factory.mktemp("redis"))
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, redis: Engine, fake_openai: Any) -> Iterator[tuple[Appliance, ...]]:
    config = {
        "discovery": {"enabled": False},
        "state": {"url": redis.url, "prefix": f"e2e:{uuid.uuid4().hex[:8]}:", "timeout_ms": 200, "retry_s": 0.5},
        "backends": [
            {"name": "fake", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]},
            {"name": "faulty", "url": fake_openai.url + "/v1", "discover": False, "models": ["fake-chat"]},
        ],
        "models": [
            {"name": "chat", "target": "fake/fake-chat"},
            {"name": "flaky", "targets": ["faulty/fake-chat"], "retries": 0},
            {"name": "flaky-or-fake", "targets": ["faulty/fake-chat", "fake/fake-chat"], "retries": 0},
        ],
        "routing": {"breaker_failures": 2, "breaker_cooldown_s": COOLDOWN_S, "breaker_min_requests": 1000,
                    "probe_interval_s": 300},
        "cache": {"enabled": True},
        # Keys are per data dir until [database] is shared (the database part's two-node tests): one admin key
        # would get a different id on each node, and a stored response belongs to its key's id.
        "auth": {"mode": "none"},
    }
    root = tmp_path_factory.mktemp("scale_out")
    apps = tuple(Appliance(root / name, config) for name in ("a", "b"))
    try:
        for app in apps:
            app.start()
            app.wait_ready()
        yield apps
    finally:
        for app in apps:
            app.stop()


def chat(app: Appliance, model: str = "chat", **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    return httpx.post(app.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)


def sdk(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60,
                         http_client=httpx.Client(timeout=60))


def breaker_of(app: Appliance, backend: str) -> str:
    return httpx.get(app.url + "/ready").json()["backends"][backend]["breaker"]["state"]


def breakers_are(apps: Any, backend: str, state: str) -> None:
    """Every worker that answers /ready (fresh connections: both workers, soon) says ``state``."""
    assert {breaker_of(app, backend) for app in apps for _ in range(4)} == {state}


def cached(app: Appliance, marker: int) -> None:
    assert chat(app, temperature=0, seed=marker).headers["x-cache"] == "HIT"


def seen_with(fake: Any, marker: int) -> int:
    return sum(1 for seen in fake.chats() if seen.body.get("seed") == marker)


# ------------------------------------------------------------------------------------------ cache


def test_an_answer_cached_via_a_is_a_hit_on_b(nodes: tuple[Appliance, ...], fake_openai: Any) -> None:
    a, b = nodes
    marker = uuid.uuid4().int % 10**9
    first = chat(a, temperature=0, seed=marker)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    # Stored right after the answer went out (as with one appliance): B finds it a moment later.
    eventually(lambda: cached(b, marker))
    upstream = seen_with(fake_openai, marker)
    hits = [chat(b, temperature=0, seed=marker) for _ in range(4)]  # fresh connections: both of B's workers
    assert [h.headers["x-cache"] for h in hits] == ["HIT"] * 4
    assert hits[0].json()["choices"] == first.json()["choices"]
    assert seen_with(fake_openai, marker) == upstream  # answered by the cache, the backend not asked


# ------------------------------------------------------------------------------------------ breakers


def test_a_breaker_opened_by_a_is_open_on_b_and_closes_on_both(nodes: tuple[Appliance, ...],
                                                              fake_openai: Any) -> None:
    a, b = nodes
    for _ in range(2):  # breaker_failures = 2, on A only
        assert chat(a, "flaky", fake_status=500).status_code == 500
    assert breaker_of(a, "faulty") == "open"
    eventually(lambda: breakers_are([b], "faulty", "open"))  # both of B's workers

    marker = uuid.uuid4().int % 10**9
    refused = chat(b, "flaky", seed=marker)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_healthy_backend"
    fallback = chat(b, "flaky-or-fake", seed=marker)
    assert fallback.status_code == 200 and fallback.headers["x-fallback-from"] == "faulty/fake-chat"
    assert fallback.headers["x-appliance-attempts"] == "1"  # faulty skipped on B, not tried
    assert seen_with(fake_openai, marker) == 1  # only the fallback's, from fake

    # After the cooldown one node wins the trial; a good answer through B closes the breaker on both.
    def trial_through_b() -> None:
        assert chat(b, "flaky").status_code == 200

    eventually(trial_through_b, timeout=15)
    eventually(lambda: breakers_are(nodes, "faulty", "closed"))


# ------------------------------------------------------------------------------------------ Responses


def test_a_conversation_started_on_a_continues_on_b(nodes: tuple[Appliance, ...], fake_openai: Any) -> None:
    a, b = nodes
    first = sdk(a).responses.create(model="chat", input="My name is Ada.")
    assert first.status == "completed"
    follow = sdk(b).responses.create(model="chat", input="What is my name?", previous_response_id=first.id)
    assert follow.status == "completed" and follow.previous_response_id == first.id
    sent = fake_openai.last_chat()["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[0]["content"] == "My name is Ada."
    assert sdk(b).responses.retrieve(first.id).id == first.id
    items = sdk(b).responses.input_items.list(follow.id, order="asc")
    assert [item.content[0].text for item in items.data][-1] == "What is my name?"
    sdk(b).responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk(a).responses.retrieve(first.id)


def test_a_websocket_on_b_continues_a_response_made_on_a(nodes: tuple[Appliance, ...], fake_openai: Any) -> None:
    a, b = nodes
    first = sdk(a).responses.create(model="chat", input="Remember 42.")
    with websockets.sync.client.connect(b.url.replace("http://", "ws://") + "/v1/responses",
                                        additional_headers=AUTH) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "chat", "input": "What number?",
                            "previous_response_id": first.id}))
        while True:
            event = json.loads(ws.recv(timeout=30))
            if event["type"] in ("response.completed", "response.failed", "error"):
                break
    assert event["type"] == "response.completed", event
    sent = fake_openai.last_chat()["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["Remember 42.", "What number?"]


# ------------------------------------------------------------------------------------------ Redis down (last)


def test_with_redis_killed_requests_flow_and_sharing_returns_with_it(nodes: tuple[Appliance, ...], redis: Engine,
                                                                     fake_openai: Any, tmp_path: Path) -> None:
    a, b = nodes
    redis.kill()
    marker = uuid.uuid4().int % 10**9
    answers = [chat(app, temperature=0, seed=marker) for app in (a, b, a, b)]
    assert [r.status_code for r in answers] == [200] * 4  # nothing waits on Redis
    assert answers[1].headers["x-cache"] == "MISS"  # B cannot see what A stored: a miss, not an error

    def degraded() -> None:  # still ready: answers flow
        status, ready, _ = a.get("/ready")
        assert status == 200 and any("shared state unreachable" in d for d in ready["degraded"])

    eventually(degraded)
    with pytest.raises(openai.APIStatusError) as info:  # a stored response cannot be looked up: 503, not 404
        sdk(b).responses.retrieve("resp_" + uuid.uuid4().hex)
    assert info.value.status_code == 503 and info.value.code == "state_unavailable"
    before = len(fake_openai.chats())
    with pytest.raises(openai.APIStatusError) as info:  # it could not be kept: refused before the client sees it
        sdk(a).responses.create(model="chat", input="hi")
    assert info.value.status_code == 503 and info.value.code == "state_unavailable"
    assert len(fake_openai.chats()) == before + 1  # not retried
    breaker = httpx.get(a.url + "/ready").json()["backends"]["fake"]["breaker"]
    assert breaker["consecutive_failures"] == 0  # Redis failing is no backend's fault
    assert sdk(a).responses.create(model="chat", input="hi", store=False).status == "completed"
    with sdk(b).responses.stream(model="chat", input="hi") as stream:  # streamed out whole, not kept
        assert stream.get_final_response().status == "completed"

    redis.start()
    again = uuid.uuid4().int % 10**9

    def shared_again() -> None:
        assert chat(a, temperature=0, seed=again).status_code == 200
        cached(b, again)

    eventually(shared_again, timeout=20)

    def recovered() -> None:
        assert a.get("/ready")[1]["degraded"] == []

    eventually(recovered)
