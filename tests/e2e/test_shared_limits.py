"""Two appliances (2 workers each) sharing their limits through one Redis ([state] url), driven alternately.

Each node keeps its own SQLite data dir (keys are not shared without [database]), so the limit under test is a
model's: a [[models]] entry with an rpm binds every caller, no key needed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import base_config
from tests.support.appliance import ADMIN_KEY, Appliance
from tests.support.engines import Engine, start_redis
from tests.support.polling import eventually

MODEL = "fake/fake-slow-2"  # no other module limits it


def config(fake_openai: Any, fake_ollama: Any, llamacpp_port: int, redis_url: str, rpm: int) -> dict[str, Any]:
    settings = base_config(fake_openai, fake_ollama, llamacpp_port)
    settings["models"] = [*settings["models"], {"name": MODEL, "rpm": rpm}]
    # retry_s short: a worker tries a Redis that came back soon after (it never waits on one that is down);
    # timeout_ms generous: a slow connect on a busy test machine must not read as Redis down (and fail open).
    settings["state"] = {"url": redis_url, "prefix": f"e2e:{uuid.uuid4().hex[:8]}:", "retry_s": 0.2,
                         "timeout_ms": 3000}
    return settings


@contextmanager
def two_nodes(root: Path, settings: dict[str, Any]) -> Iterator[tuple[Appliance, Appliance]]:
    nodes = (Appliance(root / "a", settings), Appliance(root / "b", settings))
    try:
        for node in nodes:
            node.start()
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def chat(node: Appliance) -> httpx.Response:
    """One chat on a fresh connection: either worker of the node takes it."""
    return httpx.post(node.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})


def alternating(nodes: tuple[Appliance, Appliance], n: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: chat(nodes[i % 2]), range(n)))


@pytest.fixture
def shared(tmp_path: Path, fake_openai: Any, fake_ollama: Any, llamacpp_port: int,
           redis_engine: Engine) -> Iterator[tuple[Appliance, Appliance]]:
    with two_nodes(tmp_path, config(fake_openai, fake_ollama, llamacpp_port, redis_engine.url, rpm=10)) as nodes:
        yield nodes


def test_an_rpm_of_10_admits_exactly_10_across_both_nodes(shared: tuple[Appliance, Appliance]) -> None:
    responses = alternating(shared, 30)
    assert sorted(r.status_code for r in responses) == [200] * 10 + [429] * 20
    for refused in (r for r in responses if r.status_code == 429):
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
        assert error["request_id"] == refused.headers["x-request-id"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["x-ratelimit-limit-requests"] == "10"
    # The SDK sees the same: a RateLimitError on either node.
    for node in shared:
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_with_redis_killed_requests_flow_and_the_limit_holds_again_once_it_is_back(
        tmp_path: Path, fake_openai: Any, fake_ollama: Any, llamacpp_port: int) -> None:
    redis = start_redis(tmp_path / "redis")
    try:
        settings = config(fake_openai, fake_ollama, llamacpp_port, redis.url, rpm=5)
        with two_nodes(tmp_path, settings) as nodes:
            assert sorted(r.status_code for r in alternating(nodes, 8)) == [200] * 5 + [429] * 3
            redis.kill()
            assert [r.status_code for r in alternating(nodes, 8)] == [200] * 8  # on_state_error = "open"
            redis.start()  # empty again: the window fills anew

            def both_refused() -> None:
                codes = [chat(node) for node in nodes]
                assert [r.status_code for r in codes] == [429, 429], [r.text for r in codes]
                assert {r.json()["error"]["code"] for r in codes} == {"rate_limit_exceeded"}

            eventually(both_refused)
    finally:
        redis.stop()


PRICED = {"name": "priced", "target": "fake/fake-chat", "input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000}


def test_a_budgets_spend_lives_in_redis_and_a_restart_seeds_it_once(
        tmp_path: Path, fake_openai: Any, fake_ollama: Any, llamacpp_port: int, redis_engine: Engine) -> None:
    """The ledger's spend goes to Redis at start only where Redis has nothing of the period: a restart on a
    Redis that kept it does not add it again; a Redis that lost it gets it back from the ledger."""
    settings = config(fake_openai, fake_ollama, llamacpp_port, redis_engine.url, rpm=10)
    settings["models"].append(PRICED)

    def spent(node: Appliance, key: str) -> float:
        status, view, _ = node.get("/v1/key", {"Authorization": f"Bearer {key}"})
        assert status == 200, view
        return view["state"]["spent_usd"]

    node = Appliance(tmp_path / "node", settings).start()
    try:
        status, made, _ = node.post("/admin/keys", {"name": "budget", "budget_usd": 100, "budget_period": "day"})
        assert status == 201, made
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=made["key"], max_retries=0)
        for _ in range(2):  # $21 each (the fake's usage at these prices)
            sdk.chat.completions.create(model="priced", messages=[{"role": "user", "content": "hi"}])

        def settled() -> None:  # settles go to Redis just after each answer
            assert spent(node, made["key"]) == 42

        eventually(settled)
    finally:
        node.stop()
    for prefix in (settings["state"]["prefix"], f"e2e:{uuid.uuid4().hex[:8]}:"):  # kept by Redis, then not
        settings["state"] = {**settings["state"], "prefix": prefix}
        node = Appliance(tmp_path / "node", settings).start()
        try:
            assert spent(node, made["key"]) == 42, prefix
        finally:
            node.stop()


def test_a_redis_that_lost_its_data_gets_the_budgets_spend_back_from_the_ledger(
        tmp_path: Path, fake_openai: Any, fake_ollama: Any, llamacpp_port: int) -> None:
    """Redis restarted empty under a running node: each worker that finds it again seeds the period's spend
    from the ledger, so a budget does not start again from zero."""
    redis = start_redis(tmp_path / "redis")
    settings = config(fake_openai, fake_ollama, llamacpp_port, redis.url, rpm=10)
    settings["models"].append(PRICED)
    node = Appliance(tmp_path / "node", settings)
    try:
        node.start()
        status, made, _ = node.post("/admin/keys", {"name": "budget", "budget_usd": 100, "budget_period": "day"})
        assert status == 201, made
        sdk = openai.OpenAI(base_url=node.url + "/v1", api_key=made["key"], max_retries=0)
        for _ in range(2):  # $21 each (the fake's usage at these prices)
            sdk.chat.completions.create(model="priced", messages=[{"role": "user", "content": "hi"}])

        def spent() -> None:
            status, view, _ = node.get("/v1/key", {"Authorization": f"Bearer {made['key']}"})
            assert status == 200 and view["state"]["spent_usd"] == 42, view

        def in_the_ledger() -> None:
            status, usage, _ = node.get(f"/admin/usage?key={made['id']}&group_by=key")
            assert status == 200 and sum(row["cost_usd"] for row in usage["data"]) == 42, usage

        eventually(spent)  # settled in Redis
        eventually(in_the_ledger)  # and written to the ledger (within a flush interval)
        redis.kill()
        redis.start()  # no persistence: it comes back empty
        eventually(spent)  # the workers' next calls (their breaker polls) find it again and seed it
    finally:
        node.stop()
        redis.stop()


def test_on_state_error_closed_refuses_with_503_while_redis_is_down(
        tmp_path: Path, fake_openai: Any, fake_ollama: Any, llamacpp_port: int) -> None:
    redis = start_redis(tmp_path / "redis")
    settings = config(fake_openai, fake_ollama, llamacpp_port, redis.url, rpm=100)
    settings["state"]["on_state_error"] = "closed"
    node = Appliance(tmp_path / "node", settings)
    try:
        node.start()
        assert chat(node).status_code == 200
        redis.kill()
        refused = chat(node)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "state_unavailable" and error["type"] == "server_error"
        assert error["request_id"] == refused.headers["x-request-id"] and refused.headers["Retry-After"] == "1"
        redis.start()

        def served() -> None:
            assert chat(node).status_code == 200

        eventually(served)
    finally:
        node.stop()
        redis.stop()
