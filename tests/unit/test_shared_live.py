"""The response cache and stored Responses over a real Redis ([state] url): what one node stores, another
finds; a Redis that does not answer is a cache miss, and a 503 (not a 404) for a stored response."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts.usage import Tokens
from appliance.common.config import CacheSettings, StateSettings
from appliance.common.errors import GatewayError
from appliance.common.resources import migrations_dir
from appliance.core.cache import ResponseCache
from appliance.core.shared_cache import SharedCache
from appliance.core.stored_responses import StoredResponses
from appliance.storage.db import Database
from appliance.storage.migrate import migrate
from appliance.storage.state import SharedState
from appliance.storage.writer import BufferedWriter
from tests.support.engines import Engine
from tests.support.threaded import free_port

ANSWER = b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": []}'


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def state_for(url: str, prefix: str) -> SharedState:
    return SharedState.connect(StateSettings(url=url, prefix=prefix, timeout_ms=500))


def run_with(tmp_path: Path, url: str, body: Callable[[Database, BufferedWriter, str], Awaitable[None]]) -> None:
    """Run ``body`` with an open database, its writer and a prefix no other test uses."""
    path = tmp_path / "appliance.db"
    migrate(path, migrations_dir())

    async def main() -> None:
        db = await Database.open(path)
        writer = BufferedWriter(db, 60)
        try:
            await body(db, writer, f"test:{uuid.uuid4().hex[:8]}:")
        finally:
            await db.close()

    asyncio.run(main())


def cache_on(db: Database, writer: BufferedWriter, state: SharedState, clock: Clock, **settings: Any) -> ResponseCache:
    return ResponseCache(db, writer, CacheSettings(**settings), clock=clock, shared=SharedCache(state))


async def stats(state: SharedState) -> tuple[int, int]:
    """Entries in the shared cache's index, and their bytes as counted against the cap."""
    return (await state.command("ZCARD", state.key("cache", "index")),
            int(await state.command("GET", state.key("cache", "bytes")) or 0))


async def put(cache: ResponseCache, key: str, body: bytes = ANSWER, ttl_s: float = 60) -> None:
    await cache.put(key, endpoint="chat/completions", scope=None, served="fake/m", body=body,
                    tokens=Tokens(9, 1), ttl_s=ttl_s)


def test_an_entry_stored_by_one_node_is_a_hit_on_another(tmp_path: Path, redis_engine: Engine) -> None:
    async def body(db: Database, writer: BufferedWriter, prefix: str) -> None:
        clock = Clock()
        a, b = state_for(redis_engine.url, prefix), state_for(redis_engine.url, prefix)
        node_a, node_b = cache_on(db, writer, a, clock), cache_on(db, writer, b, clock, memory_entries=0)
        try:
            assert await node_b.get("k1") is None
            await put(node_a, "k1")
            clock.now += 5
            hit = await node_b.get("k1")
            assert hit is not None and hit.body == ANSWER and hit.age_s == 5 and hit.tokens == Tokens(9, 1)
            assert (await db.fetchall("SELECT count(*) FROM response_cache"))[0][0] == 0  # Redis holds it
            assert await stats(b) == (1, pytest.approx(len(ANSWER) + 300, abs=50))
            ttl = await b.command("PTTL", b.key("cache", "e", "k1"))
            assert 55_000 < ttl <= 60_000  # the entry's own TTL
        finally:
            await a.close()
            await b.close()

    run_with(tmp_path, redis_engine.url, body)


def test_the_size_cap_evicts_the_entries_that_expire_soonest(tmp_path: Path, redis_engine: Engine) -> None:
    async def body(db: Database, writer: BufferedWriter, prefix: str) -> None:
        clock = Clock()
        state = state_for(redis_engine.url, prefix)
        cache = cache_on(db, writer, state, clock, memory_entries=0, max_mb=3000 / (1024 * 1024))
        try:
            await put(cache, "long", b"x" * 500, ttl_s=600)
            await put(cache, "short", b"y" * 500, ttl_s=60)
            await put(cache, "middle", b"z" * 500, ttl_s=300)
            assert await cache.get("short") is not None
            await put(cache, "more", b"w" * 1000, ttl_s=600)  # now over 3000 bytes: the soonest to expire goes
            assert await cache.get("short") is None
            assert [await cache.get(k) is not None for k in ("long", "middle", "more")] == [True, True, True]
            entries, size = await stats(state)
            assert entries == 3 and size <= 3000
        finally:
            await state.close()

    run_with(tmp_path, redis_engine.url, body)


def test_redis_unreachable_is_a_miss_and_a_skipped_store(tmp_path: Path, redis_engine: Engine) -> None:
    async def body(db: Database, writer: BufferedWriter, prefix: str) -> None:
        state = state_for(f"redis://127.0.0.1:{free_port()}/0", prefix)
        cache = cache_on(db, writer, state, Clock(), memory_entries=0)
        try:
            await put(cache, "k1")  # no error: the answer already went out
            assert await cache.get("k1") is None
            assert state.down
        finally:
            await state.close()

    run_with(tmp_path, redis_engine.url, body)


RESPONSE = {"id": "resp_1", "status": "completed", "output": []}


def test_stored_responses_live_in_redis_with_their_ttl(tmp_path: Path, redis_engine: Engine) -> None:
    async def body(db: Database, writer: BufferedWriter, prefix: str) -> None:
        a, b = state_for(redis_engine.url, prefix), state_for(redis_engine.url, prefix)
        try:
            await StoredResponses(db, a).save(response=RESPONSE, key_id="key_a", input_items=[{"id": "msg_1"}],
                                              conversation=[{"role": "user"}], created_at=100.0,
                                              expires_at=100.0 + 86400)
            other = StoredResponses(db, b)
            found = await other.get("resp_1", now=200.0)
            assert found is not None and found["key_id"] == "key_a" and found["input_items"] == [{"id": "msg_1"}]
            assert found["response"] == RESPONSE and found["conversation"] == [{"role": "user"}]
            assert await other.get("resp_1", now=100.0 + 86400) is None  # past keep_days
            assert 86_000_000 < await b.command("PTTL", b.key("responses", "resp_1")) <= 86_400_000
            assert (await db.fetchall("SELECT count(*) FROM responses"))[0][0] == 0
            assert await other.delete("resp_1") is True
            assert await other.delete("resp_1") is False
            assert await other.get("resp_1", now=200.0) is None
        finally:
            await a.close()
            await b.close()

    run_with(tmp_path, redis_engine.url, body)


def test_a_stored_response_redis_cannot_answer_for_is_a_503(tmp_path: Path, redis_engine: Engine) -> None:
    async def body(db: Database, writer: BufferedWriter, prefix: str) -> None:
        state = state_for(f"redis://127.0.0.1:{free_port()}/0", prefix)
        store = StoredResponses(db, state)
        try:
            for call in (lambda: store.get("resp_1", now=1.0), lambda: store.delete("resp_1"),
                         lambda: store.save(response=RESPONSE, key_id=None, input_items=[], conversation=[],
                                            created_at=1.0, expires_at=2.0)):
                with pytest.raises(GatewayError) as raised:
                    await call()
                assert (raised.value.code, raised.value.status) == ("state_unavailable", 503)
        finally:
            await state.close()

    run_with(tmp_path, redis_engine.url, body)


# ------------------------------------------------------------------------------------------ the batch lease


def test_the_batch_lease_has_one_holder_across_nodes(tmp_path: Path, redis_engine: Engine) -> None:
    from appliance.batches.lease import SharedLease

    async def body(db: Database, writer: BufferedWriter, prefix: str) -> None:
        a, b = state_for(redis_engine.url, prefix), state_for(redis_engine.url, prefix)
        node_a, node_b = SharedLease(a), SharedLease(b)  # two nodes' runners, their owners unique
        try:
            assert await node_a.take("node1-11-aa", now=0.0, ttl_s=30) is True
            assert await node_b.take("node2-22-bb", now=10.0, ttl_s=30) is False
            assert await node_a.take("node1-11-aa", now=10.0, ttl_s=30) is True  # renewed by its owner: to 40
            assert await node_b.take("node2-22-bb", now=39.0, ttl_s=30) is False
            assert await node_b.take("node2-22-bb", now=41.0, ttl_s=30) is True  # A's ran out: B takes it
            assert await node_a.take("node1-11-aa", now=42.0, ttl_s=30) is False
            await node_a.release("node1-11-aa")  # not its lease any more: nothing happens
            assert await node_b.take("node2-22-bb", now=43.0, ttl_s=30) is True
            assert 0 < await b.command("PTTL", b.key("lease", "batches")) <= 30_000  # a dead node's lease goes
            await node_b.release("node2-22-bb")
            assert await a.command("EXISTS", a.key("lease", "batches")) == 0
            assert await node_a.take("node1-11-aa", now=44.0, ttl_s=30) is True
        finally:
            await a.close()
            await b.close()

    run_with(tmp_path, redis_engine.url, body)


def test_the_lease_is_in_redis_only_when_the_batches_are_shared_too(tmp_path: Path) -> None:
    from appliance.batches.lease import DatabaseLease, SharedLease, lease_for
    from appliance.common.config import Settings

    state = state_for("redis://127.0.0.1:1/0", "test:")  # no connection is made here
    both = Settings(state={"url": "redis://127.0.0.1:1/0"}, database={"url": "postgresql://u@127.0.0.1:1/db"})
    redis_only = Settings(state={"url": "redis://127.0.0.1:1/0"})
    assert isinstance(lease_for(both, None, state), SharedLease)  # type: ignore[arg-type]
    assert isinstance(lease_for(redis_only, None, state), DatabaseLease)  # type: ignore[arg-type]
    assert isinstance(lease_for(Settings(), None, None), DatabaseLease)  # type: ignore[arg-type]


def test_a_start_clears_the_lease_only_when_no_other_node_can_hold_it(tmp_path: Path,
                                                                      database_url: str | None) -> None:
    """SQLite: the lease was this appliance's own, and its holder is dead. A shared database: another node may
    hold it now, so it is left to expire."""
    from appliance.batches.runner import prepare_data_dir
    from appliance.common.config import Settings
    from appliance.storage.engine import connect_sync, migrate_database

    settings = Settings.model_validate({"server": {"data_dir": str(tmp_path)}, "database": {"url": database_url}})
    migrate_database(tmp_path, database_url, migrations_dir())
    conn = connect_sync(tmp_path, database_url)
    conn.execute("INSERT INTO runner_lease (name, owner, expires_at) VALUES ('batches', 'other', 1e12)")
    conn.close()
    prepare_data_dir(settings)
    conn = connect_sync(tmp_path, database_url)
    try:
        owners = [row[0] for row in conn.execute("SELECT owner FROM runner_lease")]
    finally:
        conn.close()
    assert owners == ([] if database_url is None else ["other"])
