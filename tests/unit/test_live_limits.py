"""Limits in Redis ([state] url) against a real server: two limiters stand for two nodes, racing with gather.

Each test has its own key prefix, so tests share the session's Redis without seeing each other's counters.
Clocks are injected; a test that kills Redis starts its own.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts.limits import Admission, Limiter, Scope, SharedTable, period_start_day
from appliance.accounts.live_limits import RedisLimiter
from appliance.common.config import StateSettings
from appliance.common.errors import GatewayError
from appliance.storage.state import SharedState
from tests.support.engines import Engine, start_redis


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Nodes:
    """Limiters on one Redis under one fresh prefix, each with its own connection (as separate nodes)."""

    def __init__(self, url: str, **settings: Any) -> None:
        # A generous timeout: a slow call on a busy test machine must not read as Redis down (and fail open).
        self.settings = StateSettings(url=url, prefix=f"test:{uuid.uuid4().hex[:8]}:", **{"timeout_ms": 5000,
                                                                                           **settings})
        self.made: list[RedisLimiter] = []
        self.states: list[SharedState] = []

    def node(self, clock: Clock, *, lease_s: float = 30.0, window_s: float = 60) -> RedisLimiter:
        state = SharedState.connect(self.settings)
        self.states.append(state)
        limiter = RedisLimiter(state, window_s, clock=clock, lease_s=lease_s)
        self.made.append(limiter)
        return limiter

    async def close(self) -> None:
        for limiter in self.made:
            await limiter.close()
        for state in self.states:
            await state.close()


async def outcomes(calls: list[Coroutine[Any, Any, Admission | None]]) -> tuple[list[Admission], list[GatewayError]]:
    """Run ``calls`` at once: what was admitted, what was refused."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    admitted = [r for r in results if isinstance(r, Admission)]
    refused = [r for r in results if isinstance(r, GatewayError)]
    assert len(admitted) + len(refused) == len(calls), results
    return admitted, refused


@synchronous
async def test_rpm_across_two_nodes_admits_exactly_the_limit(redis_engine: Engine) -> None:
    nodes, clock = Nodes(redis_engine.url), Clock()
    a, b = nodes.node(clock), nodes.node(clock)
    scope = Scope("key_a", 0, rpm=10)
    try:
        admitted, refused = await outcomes([(a if i % 2 else b).admit((scope,), tokens=0, cost=0, headers_for=scope)
                                            for i in range(40)])
        assert len(admitted) == 10 and len(refused) == 30
        assert {r.code for r in refused} == {"rate_limit_exceeded"} and {r.status for r in refused} == {429}
        assert refused[0].headers["Retry-After"] == "60" and refused[0].headers["x-ratelimit-remaining-requests"] == "0"
        assert sorted(int(x.headers["x-ratelimit-remaining-requests"]) for x in admitted) == list(range(10))
        clock.now += 60  # the window slid past all of them
        await b.admit((scope,), tokens=0, cost=0)
    finally:
        await nodes.close()


@synchronous
async def test_tpm_takes_the_estimate_then_settles_to_what_was_used(redis_engine: Engine) -> None:
    nodes, clock = Nodes(redis_engine.url), Clock()
    a, b = nodes.node(clock), nodes.node(clock)
    scope = Scope("key_t", 0, tpm=100)
    try:
        admitted, refused = await outcomes([(a, b)[i % 2].admit((scope,), tokens=30, cost=0) for i in range(10)])
        assert len(admitted) == 3 and {r.extra["limit"] for r in refused} == {"tokens"}
        for admission in admitted:
            a.settle(admission, tokens=10, cost=0)
        await a.settled()
        assert (await b.budget_state(scope))["tokens_in_window"] == 30
        too_large = (await outcomes([b.admit((scope,), tokens=101, cost=0)]))[1][0]
        assert too_large.headers["x-should-retry"] == "false" and "too large" in too_large.message
    finally:
        await nodes.close()


@synchronous
async def test_a_settle_rides_with_the_next_admit_unless_it_frees_a_place(redis_engine: Engine) -> None:
    """Tokens and spend wait for the worker's next admit (ahead of it, one round trip); a place in flight is
    freed at once, so a client's next request finds it free on any node."""
    nodes, clock = Nodes(redis_engine.url), Clock()
    a, b = nodes.node(clock), nodes.node(clock)
    tokens, places = Scope("key_r", 0, tpm=1000), Scope("key_p", 0, max_concurrent=1)
    try:
        for _ in range(3):
            admission = await a.admit((tokens,), tokens=100, cost=0)
            assert admission is not None
            a.settle(admission, tokens=10, cost=0)
            assert a._pending  # not sent on its own: the next admit carries it
        await a.admit((tokens,), tokens=100, cost=0)
        assert (await b.budget_state(tokens))["tokens_in_window"] == 130  # 3 settled to 10, the last at 100
        for node, other in ((a, b), (b, a)):
            admission = await node.admit((places,), tokens=0, cost=0)
            assert admission is not None
            node.settle(admission, tokens=0, cost=0)
            assert node._flushing is not None and node._flush_timer is None  # on its way now, not on a timer
            await node.settled()
            taken = await other.admit((places,), tokens=0, cost=0)
            assert taken is not None  # the place was free on the other node
            other.settle(taken, tokens=0, cost=0)
            await other.settled()
    finally:
        await nodes.close()


@synchronous
async def test_max_concurrent_counts_requests_in_flight_on_every_node(redis_engine: Engine) -> None:
    nodes, clock = Nodes(redis_engine.url), Clock()
    a, b = nodes.node(clock), nodes.node(clock)
    scope = Scope("key_c", 0, max_concurrent=3)
    try:
        admitted, refused = await outcomes([(a, b)[i % 2].admit((scope,), tokens=0, cost=0) for i in range(10)])
        assert len(admitted) == 3 and {r.extra["limit"] for r in refused} == {"concurrency"}
        for admission in admitted:  # any node may give a place back: it is named by its admission
            a.settle(admission, tokens=0, cost=0)
        await a.settled()
        admitted, _ = await outcomes([(a, b)[i % 2].admit((scope,), tokens=0, cost=0) for i in range(10)])
        assert len(admitted) == 3
    finally:
        await nodes.close()


@synchronous
async def test_a_dead_nodes_places_in_flight_free_themselves_after_the_lease(redis_engine: Engine) -> None:
    nodes = Nodes(redis_engine.url)
    dead_clock, live_clock = Clock(), Clock()
    dead, live = nodes.node(dead_clock, lease_s=30), nodes.node(live_clock, lease_s=30)
    scope = Scope("key_d", 0, max_concurrent=1)
    try:
        await live.admit((scope,), tokens=0, cost=0)  # renewed by its holder, it stays as long as it runs
        live_clock.now += 20
        await live.renew()
        live_clock.now += 20  # 40 s after it came, 20 s after its renewal
        assert (await outcomes([dead.admit((scope,), tokens=0, cost=0)]))[1][0].extra["limit"] == "concurrency"
        live._held.clear()  # the live node stops renewing: as if killed
        live_clock.now += 9
        assert (await outcomes([live.admit((scope,), tokens=0, cost=0)]))[1], "still within its lease"
        live_clock.now += 2  # 51 s: the renewal's deadline (20 + 30) is past
        await live.admit((scope,), tokens=0, cost=0)
    finally:
        await nodes.close()


@synchronous
async def test_a_budget_stops_at_the_same_spend_on_both_nodes(redis_engine: Engine) -> None:
    nodes, clock = Nodes(redis_engine.url), Clock()
    a, b = nodes.node(clock), nodes.node(clock)
    scope = Scope("key_b", 0, budget_usd=1.0, budget_period="day")
    try:
        admitted, refused = await outcomes([(a, b)[i % 2].admit((scope,), tokens=10, cost=0.3) for i in range(10)])
        assert len(admitted) == 3 and {r.code for r in refused} == {"budget_exceeded"}
        for admission in admitted:
            b.settle(admission, tokens=12, cost=0.25)
        await b.settled()
        state = await a.budget_state(scope)
        assert state["spent_usd"] == pytest.approx(0.75) and state["spent_tokens"] == 36
        assert state["remaining_usd"] == pytest.approx(0.25)
        await a.admit((scope,), tokens=10, cost=0.2)  # fits: 0.95
        for limiter in (a, b):
            assert (await outcomes([limiter.admit((scope,), tokens=10, cost=0.1)]))[1][0].code == "budget_exceeded"
    finally:
        await nodes.close()


@synchronous
async def test_a_new_period_starts_from_nothing(redis_engine: Engine) -> None:
    nodes, clock = Nodes(redis_engine.url), Clock()
    a = nodes.node(clock)
    scope = Scope("key_p", 0, budget_tokens=100, budget_period="day")
    try:
        a.settle(await a.admit((scope,), tokens=100, cost=0), tokens=100, cost=0)
        await a.settled()
        assert (await outcomes([a.admit((scope,), tokens=1, cost=0)]))[1][0].code == "budget_exceeded"
        clock.now += 86400
        state = await a.budget_state(scope)
        assert state["spent_tokens"] == 0 and state["period_start"] == period_start_day("day", clock.now)
        await a.admit((scope,), tokens=100, cost=0)
    finally:
        await nodes.close()


@synchronous
async def test_preload_seeds_a_period_once_however_many_nodes_start(redis_engine: Engine) -> None:
    nodes, clock = Nodes(redis_engine.url), Clock()
    a, b = nodes.node(clock), nodes.node(clock)
    scope = Scope("key_s", 0, budget_usd=10.0, budget_period="month")
    try:
        seeded = await asyncio.gather(a.preload(scope, spent_usd=4.0, spent_tokens=400),
                                      b.preload(scope, spent_usd=4.0, spent_tokens=400))
        assert sorted(seeded) == [False, True]
        state = await b.budget_state(scope)
        assert state["spent_usd"] == 4.0 and state["spent_tokens"] == 400
        assert await a.preload(scope, spent_usd=5.0, spent_tokens=500, replace=True)  # budget_counts changed
        assert (await b.budget_state(scope))["spent_usd"] == 5.0
    finally:
        await nodes.close()


def test_the_same_requests_get_the_same_answers_as_in_shared_memory(redis_engine: Engine) -> None:
    """Headers, refusals and their Retry-After match limits.Limiter's, step by step."""
    clock = Clock()
    local = Limiter(SharedTable(4, shared=False), 60, 0, clock)
    key, model = Scope("key_e", 0, rpm=4, tpm=250), Scope("model:m", 1, rpm=3)

    def answer(result: Admission | BaseException) -> Any:
        if isinstance(result, GatewayError):
            return result.code, result.headers, result.extra, result.message
        assert isinstance(result, Admission)
        return result.headers

    async def run() -> None:
        nodes = Nodes(redis_engine.url)
        remote = nodes.node(clock)
        try:
            for step, tokens in enumerate((50, 100, 120, 10, 20, 300, 30, 40)):
                clock.now += 7 * step
                try:
                    expected: Any = answer(local.admit((key, model), tokens=tokens, cost=0, headers_for=key))
                except GatewayError as exc:
                    expected = answer(exc)
                try:
                    got: Any = answer(await remote.admit((key, model), tokens=tokens, cost=0, headers_for=key))
                except GatewayError as exc:
                    got = answer(exc)
                assert got == expected, step
        finally:
            await nodes.close()

    asyncio.run(run())


@synchronous
async def test_redis_down_open_passes_closed_refuses_and_both_recover(tmp_path: Path) -> None:
    engine = start_redis(tmp_path)
    open_nodes = Nodes(engine.url, on_state_error="open", retry_s=0.05, timeout_ms=200)
    closed_nodes = Nodes(engine.url, on_state_error="closed", retry_s=0.05, timeout_ms=200)
    clock = Clock()
    fails_open, fails_closed = open_nodes.node(clock), closed_nodes.node(clock)
    scope = Scope("key_r", 0, rpm=1)
    try:
        await fails_open.admit((scope,), tokens=0, cost=0)
        engine.kill()
        assert await fails_open.admit((scope,), tokens=0, cost=0) is None  # passes, nothing to settle
        assert await fails_open.admit((scope,), tokens=0, cost=0) is None
        refused = (await outcomes([fails_closed.admit((scope,), tokens=0, cost=0)]))[1][0]
        assert refused.status == 503 and refused.code == "state_unavailable" and refused.headers["Retry-After"] == "1"
        engine.start()  # an empty Redis again (no persistence): the window starts anew

        async def recovered(limiter: RedisLimiter) -> Admission:
            for _ in range(100):  # each is refused at once while Redis is taken as down (retry_s)
                try:
                    admission = await limiter.admit((scope,), tokens=5, cost=0)
                except GatewayError as exc:
                    assert exc.code == "state_unavailable"
                    admission = None
                if admission is not None:
                    return admission
                await asyncio.sleep(0.05)
            raise AssertionError("Redis did not come back")

        for limiter in (fails_open, fails_closed):
            limiter.settle(await recovered(limiter), tokens=7, cost=0)  # the restarted Redis lost the scripts too
            await limiter.settled()
            assert (await limiter.budget_state(scope))["tokens_in_window"] == 7
            refused = (await outcomes([limiter.admit((scope,), tokens=0, cost=0)]))[1][0]
            assert refused.code == "rate_limit_exceeded"  # the limit holds again
    finally:
        await open_nodes.close()
        await closed_nodes.close()
        engine.stop()
