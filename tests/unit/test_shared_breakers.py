"""Breakers and backend load across nodes over a real Redis: what one node's failures open is open on the
other after a poll, one half-open trial across the nodes, in-flight counts summed; Redis down: local again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from appliance.common.config import RoutingSettings, StateSettings
from appliance.core.resilience import BackendTable, Breakers
from appliance.core.shared_breakers import BreakerSync
from appliance.storage.state import SharedState, StateUnavailable
from tests.support.engines import Engine, start_redis

NOW = 1_800_000_000.0
SETTINGS = RoutingSettings(breaker_failures=2, breaker_cooldown_s=15, probe_interval_s=1)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Node:
    """One appliance: its own breaker table, one worker's Breakers and sync."""

    def __init__(self, url: str, prefix: str, name: str, clock: Clock) -> None:
        self.state = SharedState.connect(StateSettings(url=url, prefix=prefix, timeout_ms=500, retry_s=30))
        self.breakers = Breakers(BackendTable(16, shared=False), SETTINGS, 0, clock)
        self.sync = BreakerSync(self.state, self.breakers, name)
        self.sync.attach()

    async def fail(self, backend: str, times: int) -> None:
        for _ in range(times):
            self.breakers.record(backend, ok=False)
        await self.sync.published()


def two_nodes(url: str, test: Callable[[Node, Node, Clock], Awaitable[None]]) -> None:
    async def main() -> None:
        clock = Clock()
        prefix = f"test:{uuid.uuid4().hex[:8]}:"
        a, b = Node(url, prefix, "node-a", clock), Node(url, prefix, "node-b", clock)
        for node in (a, b):
            node.breakers.set_probe("vllm", up=True)  # each node has met the backend (its row exists)
        try:
            await test(a, b, clock)
        finally:
            await a.state.close()
            await b.state.close()

    asyncio.run(main())


def test_a_breaker_opened_by_one_node_is_open_on_the_other_and_closes_on_both(redis_engine: Engine) -> None:
    async def test(a: Node, b: Node, clock: Clock) -> None:
        await a.fail("vllm", 2)
        assert not a.breakers.allow("vllm")
        assert b.breakers.allow("vllm")  # B has not polled yet
        await b.sync.poll()
        assert not b.breakers.allow("vllm") and b.breakers.state("vllm")["state"] == "open"
        clock.now += 15  # the cooldown is over: no node grants a trial by itself
        assert not a.breakers.allow("vllm") and not b.breakers.allow("vllm")
        await b.sync.poll()  # B claims the one trial
        await a.sync.poll()  # A finds it taken
        assert not a.breakers.allow("vllm")
        assert b.breakers.allow("vllm") and not b.breakers.allow("vllm")  # exactly one
        b.breakers.record("vllm", ok=True)
        await b.sync.published()
        await a.sync.poll()
        assert a.breakers.allow("vllm") and a.breakers.state("vllm")["state"] == "closed"
        assert b.breakers.state("vllm")["state"] == "closed"

    two_nodes(redis_engine.url, test)


def test_a_failed_trial_reopens_on_every_node(redis_engine: Engine) -> None:
    async def test(a: Node, b: Node, clock: Clock) -> None:
        await a.fail("vllm", 2)
        await b.sync.poll()
        clock.now += 15
        await a.sync.poll()
        assert a.breakers.allow("vllm")
        await a.fail("vllm", 1)  # the trial failed: open for a fresh cooldown, everywhere
        clock.now += 1
        await b.sync.poll()
        state = b.breakers.state("vllm")
        assert state["state"] == "open" and state["retry_after_s"] == 14
        clock.now += 14
        await b.sync.poll()  # the trial key went with the change: a new trial can be claimed
        assert b.breakers.allow("vllm")

    two_nodes(redis_engine.url, test)


def test_changes_still_reach_the_nodes_after_redis_lost_its_data(redis_engine: Engine) -> None:
    async def test(a: Node, b: Node, clock: Clock) -> None:
        await a.fail("vllm", 2)
        await b.sync.poll()
        assert b.breakers.state("vllm")["state"] == "open"
        # A Redis restarted without its data (only this test's keys: the server is the session's).
        keys = await a.state.command("KEYS", a.state.prefix + "*")
        assert keys
        await a.state.command("DEL", *keys)
        clock.now += 15
        await b.sync.poll()
        assert b.breakers.allow("vllm")
        b.breakers.record("vllm", ok=True)
        await b.sync.published()
        await a.sync.poll()  # the versions went on from Redis's clock, not from 1 again
        assert a.breakers.state("vllm")["state"] == "closed"

    two_nodes(redis_engine.url, test)


def test_in_flight_is_summed_across_nodes(redis_engine: Engine) -> None:
    async def test(a: Node, b: Node, clock: Clock) -> None:
        a.breakers.begin("vllm", "m")
        a.breakers.begin("vllm", "m")
        b.breakers.begin("vllm", "m")
        await a.sync.poll()
        await b.sync.poll()
        assert b.breakers.in_flight("vllm") == 3 and b.breakers.in_flight("vllm", "m") == 3
        assert b.breakers.busy("vllm") == 3.0 and b.breakers.state("vllm")["in_flight"] == 3
        await a.sync.poll()
        assert a.breakers.in_flight("vllm") == 3
        a.breakers.end("vllm", "m")
        a.breakers.end("vllm", "m")
        await a.sync.poll()
        await b.sync.poll()
        assert b.breakers.in_flight("vllm") == 1

    two_nodes(redis_engine.url, test)


def test_with_redis_down_each_node_keeps_its_own_breakers(tmp_path: Path) -> None:
    engine = start_redis(tmp_path)
    try:
        async def test(a: Node, b: Node, clock: Clock) -> None:
            await a.fail("vllm", 2)
            await b.sync.poll()
            assert not b.breakers.allow("vllm")
            engine.kill()
            clock.now += 15
            await a.fail("other", 2)  # the change cannot be written: A keeps it to itself, without waiting
            with pytest.raises(StateUnavailable):  # the background loop swallows it; here it shows
                await b.sync.poll()
            assert b.state.down
            assert b.breakers.allow("vllm")  # trials granted locally again
            assert not a.breakers.allow("other")

        two_nodes(engine.url, test)
    finally:
        engine.stop()
