"""The fair queue (core/admission.py): start-time fair queuing between keys over the shared backend table, with an
injected clock (a waiter's poll advances it) and two "workers" sharing one table."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from appliance.common.config import AdmissionSettings, BackendSettings, RoutingSettings
from appliance.common.errors import GatewayError
from appliance.core.admission import QUEUE_SLOTS, FairQueue, QueueTable
from appliance.core.resilience import BackendTable, Breakers
from appliance.providers.load import Load


def synchronous(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())
    return run


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class World:
    """Shared tables, and a worker's handles on them."""

    def __init__(self, *, capacity: int | None = 1, timeout_ms: int = 3_600_000, kind: str | None = None) -> None:
        self.clock = Clock()
        self.backends = BackendTable(16, shared=False)
        self.queue = QueueTable(shared=False)
        self.settings = AdmissionSettings(queue_timeout_ms=timeout_ms)
        self.configured = {"b": BackendSettings(name="b", url="http://127.0.0.1:1", max_concurrency=capacity)}
        self.kind = kind
        self.admitted: list[str] = []

    def worker(self, index: int = 0) -> tuple[Breakers, FairQueue]:
        breakers = Breakers(self.backends, RoutingSettings(), index, self.clock)
        fair = FairQueue(self.queue, breakers, self.settings, self.configured, lambda _name: self.kind, index,
                         self.clock, self.clock.sleep)
        return breakers, fair

    async def request(self, fair: FairQueue, name: str, key: str, weight: float | None = None,
                      wait_s: float | None = None) -> float | None:
        _, waited = await fair.begin("b", None, key, weight, wait_s)
        self.admitted.append(name)
        return waited


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def serve_in_turn(world: World, breakers: Breakers, fair: FairQueue, count: int) -> list[str]:
    """Let ``count`` waiters in, one at a time (capacity 1): end the running request, wait for the next to begin."""
    order: list[str] = []
    for _ in range(count):
        seen = len(world.admitted)
        breakers.end("b")
        fair.released("b")
        while len(world.admitted) == seen:
            await asyncio.sleep(0)
        order.append(world.admitted[-1])
    return order


async def flood(world: World, fair: FairQueue, key: str, count: int, weight: float | None = None) -> list[Any]:
    tasks = [asyncio.create_task(world.request(fair, f"{key}{i}", key, weight)) for i in range(count)]
    await settle()
    return tasks


@synchronous
async def test_a_request_with_room_goes_in_at_once_and_without_a_capacity_nothing_queues() -> None:
    world = World(capacity=2)
    breakers, fair = world.worker()
    assert await world.request(fair, "a", "A") is None
    assert await world.request(fair, "b", "A") is None
    assert breakers.in_flight("b") == 2
    unknown = World(capacity=None)
    breakers, fair = unknown.worker()
    for i in range(5):
        assert await unknown.request(fair, str(i), "A") is None
    assert breakers.in_flight("b") == 5 and breakers.state("b")["queued"] == 0


@synchronous
async def test_a_newcomer_waits_for_at_most_one_of_a_flooding_keys_requests() -> None:
    world = World()
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    tasks = await flood(world, fair, "A", 20)
    assert breakers.state("b")["queued"] == 20
    tasks += await flood(world, fair, "B", 1)
    order = await serve_in_turn(world, breakers, fair, 21)
    assert order.index("B0") <= 1, order
    assert [n for n in order if n.startswith("A")] == [f"A{i}" for i in range(20)]  # FIFO within a key
    await asyncio.gather(*tasks)


@synchronous
async def test_weights_two_to_one_give_two_to_one_turns() -> None:
    world = World()
    breakers, fair = world.worker()
    await world.request(fair, "first", "C")
    tasks = await flood(world, fair, "A", 30, weight=2)
    tasks += await flood(world, fair, "B", 30, weight=1)
    order = await serve_in_turn(world, breakers, fair, 30)
    heavy = sum(1 for n in order if n.startswith("A"))
    assert 19 <= heavy <= 21, order
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert breakers.state("b")["queued"] == 0


@synchronous
async def test_a_key_that_just_had_a_turn_waits_behind_one_that_had_none() -> None:
    world = World()
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    tasks = await flood(world, fair, "A", 1)
    assert await serve_in_turn(world, breakers, fair, 1) == ["A0"]  # A's finish tag is kept past its turn
    tasks += await flood(world, fair, "A", 1)
    tasks += await flood(world, fair, "B", 1)
    assert await serve_in_turn(world, breakers, fair, 2) == ["B0", "A0"]
    await asyncio.gather(*tasks)


@synchronous
async def test_the_deadline_gives_429_backend_overloaded_with_retry_after() -> None:
    world = World(timeout_ms=200)
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    with pytest.raises(GatewayError) as caught:
        await world.request(fair, "late", "B")
    error = caught.value
    assert (error.status, error.code, error.type) == (429, "backend_overloaded", "rate_limit_error")
    assert "'b'" in error.message and int(error.headers["Retry-After"]) >= 1
    with pytest.raises(GatewayError):
        await world.request(fair, "own", "B", wait_s=0.05)  # the request's own timeout caps the wait
    assert breakers.state("b")["queued"] == 0 and breakers.in_flight("b") == 1


@synchronous
async def test_the_retry_after_follows_the_drain_rate() -> None:
    world = World(timeout_ms=100)
    breakers, fair = world.worker()
    for _ in range(3):  # one end every 10 s
        await world.request(fair, "x", "A")
        world.clock.now += 10
        breakers.end("b")
    await world.request(fair, "running", "A")
    with pytest.raises(GatewayError) as caught:
        await world.request(fair, "late", "B")
    assert caught.value.headers["Retry-After"] == "10"


@synchronous
async def test_a_cancelled_waiter_leaves_no_hole() -> None:
    world = World()
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    tasks = await flood(world, fair, "A", 2)
    tasks += await flood(world, fair, "B", 1)
    tasks[0].cancel()  # waiting: leaves the queue at once
    await settle()
    assert breakers.state("b")["queued"] == 2
    breakers.end("b")
    fair.released("b")  # grants B0 (A1 comes after A0's finish tag); cancelled before it begins, it passes on
    assert world.backends.find("b").reserved == 1
    tasks[2].cancel()
    await asyncio.gather(tasks[1])
    assert world.admitted == ["first", "A1"]
    assert world.backends.find("b").reserved == 0


@synchronous
async def test_two_workers_share_one_queue() -> None:
    world = World()
    breakers0, fair0 = world.worker(0)
    breakers1, fair1 = world.worker(1)
    await world.request(fair0, "first", "A")
    waiter = asyncio.create_task(world.request(fair1, "other", "B"))
    await settle()
    assert breakers1.state("b")["queued"] == 1 and world.admitted == ["first"]
    breakers0.end("b")
    fair0.released("b")  # worker 0 frees the place; worker 1's waiter takes it
    assert await waiter is not None
    assert world.admitted == ["first", "other"] and breakers0.in_flight("b") == 1
    fair1.forget_worker()  # a restarted worker 1 drops nothing it no longer holds


@synchronous
async def test_a_waiter_takes_room_nobody_granted() -> None:
    world = World()
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    task = asyncio.create_task(world.request(fair, "next", "B"))
    await settle()
    breakers.end("b")  # no released(): the waiter's own poll sees the room
    assert await task is not None


@synchronous
async def test_capacity_learned_from_slots_and_known_kinds() -> None:
    world = World(capacity=None)
    breakers, fair = world.worker()
    assert fair.capacity("b") is None
    breakers.set_load("b", Load(slots_total=2, slots_idle=2))
    assert fair.capacity("b") == 2
    single = World(capacity=None, kind="llama-cpp-python")
    assert single.worker()[1].capacity("b") == 1
    off = World()
    off.settings = AdmissionSettings(enabled=False)
    assert off.worker()[1].capacity("b") is None


@synchronous
async def test_a_full_queue_refuses_at_once() -> None:
    world = World()
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    tasks = await flood(world, fair, "A", QUEUE_SLOTS)
    with pytest.raises(GatewayError) as caught:
        await world.request(fair, "one too many", "B")
    assert caught.value.status == 429 and "full" in caught.value.message
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert breakers.state("b")["queued"] == 0


@synchronous
async def test_a_dead_workers_places_are_dropped_by_its_successor() -> None:
    world = World()
    breakers0, fair0 = world.worker(0)
    _, fair1 = world.worker(1)
    await world.request(fair0, "first", "A")
    lost = asyncio.create_task(world.request(fair1, "lost", "B"))
    await settle()
    lost.cancel()  # the process is gone: nothing of it runs again, but its entry stays in shared memory...
    fair1._leave = lambda *_: None  # type: ignore[method-assign]  # ...as a killed process leaves it
    await asyncio.gather(lost, return_exceptions=True)
    assert breakers0.state("b")["queued"] == 1
    _, successor = world.worker(1)
    successor.forget_worker()
    assert breakers0.state("b")["queued"] == 0
    waiter = asyncio.create_task(world.request(fair0, "next", "C"))
    await settle()
    breakers0.end("b")
    fair0.released("b")
    assert await waiter is not None and world.admitted == ["first", "next"]


@synchronous
async def test_a_reload_changes_the_capacity_and_the_switch() -> None:
    world = World(capacity=1)
    breakers, fair = world.worker()
    await world.request(fair, "first", "A")
    waiter = asyncio.create_task(world.request(fair, "next", "B"))
    await settle()
    assert breakers.state("b")["queued"] == 1
    fair.reconfigure(world.settings, {"b": world.configured["b"].model_copy(update={"max_concurrency": 2})})
    assert await waiter is not None  # the waiter's own poll sees the new room
    fair.reconfigure(AdmissionSettings(enabled=False), world.configured)
    assert fair.capacity("b") is None and await world.request(fair, "third", "C") is None
    assert breakers.in_flight("b") == 3
