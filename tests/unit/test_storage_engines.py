"""Every repo on both engines: SQLite in the data dir, and PostgreSQL when ``[database] url`` is set.

Each test gets a migrated database of each engine (the ``database_url`` fixture: None or a new PostgreSQL
database), so the same assertions hold the two to one behaviour.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.accounts import auth
from appliance.common.config import DatabaseSettings
from appliance.common.resources import migrations_dir
from appliance.storage import (
    batches_repo,
    cache_repo,
    files_repo,
    keys_repo,
    ledger,
    requests_repo,
    responses_repo,
    stats_repo,
    templates_repo,
    usage_repo,
    vision_repo,
)
from appliance.storage.db import Database
from appliance.storage.engine import connect_sync, migrate_database, open_database
from appliance.storage.requests_repo import RequestRecord
from appliance.storage.writer import BufferedWriter
from tests.support.engines import on_database

NOW = 1_765_000_000.0
Work = Callable[[Database], Awaitable[Any]]


@pytest.fixture
def run(tmp_path: Path, database_url: str | None) -> Callable[[Work], Any]:
    return on_database(tmp_path, database_url)


def record(i: int, **fields: Any) -> RequestRecord:
    values: dict[str, Any] = dict(
        request_id=f"req-{i}", created_at=NOW + i, endpoint="/v1/chat/completions", model="chat", backend="fake",
        backend_model="fake-chat", status=200, error_code=None, stream=False, latency_ms=3.5, overhead_ms=0.4,
        ttft_ms=None, prompt_tokens=10, completion_tokens=5, estimated=False, key_id="key_a", cached_tokens=0,
        input_cost_usd=0.001, output_cost_usd=0.002, cost_usd=0.003, cache=None)
    return RequestRecord(**{**values, **fields})


def test_keys_slots_secret_and_changes(run: Callable[[Work], Any]) -> None:
    async def work(db: Database) -> None:
        secret = await keys_repo.install_secret(db)
        assert isinstance(secret, bytes) and len(secret) == 32
        first, key = await auth.create_key(db, {"name": "a", "rpm": 5, "models": ["chat*"]}, slots=4)
        second, _ = await auth.create_key(db, {"name": "b"}, slots=4)
        assert (first["slot"], second["slot"]) == (0, 1)
        assert first["models"] == ["chat*"] and first["enabled"] is True and first["rpm"] == 5
        found = await keys_repo.find_by_hash(db, auth.key_hash(key, secret))
        assert found is not None and found["id"] == first["id"]
        changed = await keys_repo.update(db, first["id"], {"enabled": False, "metadata": {"team": "x"}},
                                         upstream_keys={"fake": "token"})
        assert changed is not None and changed["enabled"] is False and changed["metadata"] == {"team": "x"}
        assert changed["upstream_keys"] == {"fake": "token"}
        assert await keys_repo.delete(db, first["id"]) and not await keys_repo.delete(db, first["id"])
        third, _ = await auth.create_key(db, {"name": "c"}, slots=4)
        assert third["slot"] == 0  # the lowest free slot again
        assert await keys_repo.count(db) == 2
        assert [row["name"] for row in await keys_repo.list_all(db)] == ["b", "c"]

    run(work)


def test_ledger_rollups_and_request_log(run: Callable[[Work], Any]) -> None:
    async def work(db: Database) -> None:
        entries = [ledger.Entry(record(i, status=500 if i == 2 else 200, stream=i == 1, ttft_ms=1.0,
                                       cache="HIT" if i == 3 else None),
                                ledger.bodies_of(b'{"q": 1}', b"\x00\xffanswer", 4) if i == 0 else None)
                   for i in range(4)]
        await db.write(lambda conn: ledger.apply(conn, entries))
        await db.write(lambda conn: ledger.apply(conn, [ledger.Entry(record(9, key_id="key_b"))]))
        assert await requests_repo.count(db) == 5
        ids = [row["id"] for row in await requests_repo.recent(db)]
        assert len(set(ids)) == 5 and ids == sorted(ids, reverse=True)
        found = await requests_repo.search(db, limit=10, key_id="key_a", status_class=5, with_bodies=False)
        assert [row["request_id"] for row in found] == ["req-2"]
        with_bodies = await requests_repo.search(db, limit=1, status=200, before_id=ids[0], with_bodies=True)
        assert [row["request_id"] for row in with_bodies] == ["req-3"]
        first = (await requests_repo.search(db, limit=10, with_bodies=True))[-1]
        assert (first["request_body"], first["response_body"], first["body_truncated"]) == \
            (b'{"q"', b"\x00\xffan", True)
        by_model = await usage_repo.report(db, group_by="model")
        assert by_model == [{"model": "chat", "requests": 5, "errors": 1, "prompt_tokens": 50,
                             "completion_tokens": 25, "cached_tokens": 0, "cost_usd": 0.015,
                             "compute_cost_usd": 0.0}]
        by_key = await usage_repo.report(db, group_by="key", day_from="2000-01-01")
        assert [(row["key"], row["requests"]) for row in by_key] == [("key_a", 4), ("key_b", 1)]
        usd, tokens = await usage_repo.spent(db, "key_a", "2000-01-01", "both")
        assert (round(usd, 9), tokens) == (0.012, 60)
        models = await stats_repo.models_on(db, usage_repo.day_of(NOW))
        assert models[0]["requests"] == 5 and models[0]["cache_hits"] == 1
        minute = int(NOW // 60)
        traffic = await stats_repo.traffic(db, minute)
        assert sum(row["requests"] for row in traffic) == 5
        assert await stats_repo.backend_counts(db, minute) == {"fake": (4, 1)}
        timings = await stats_repo.backend_timings(db, NOW - 1, 10)
        assert sorted(t[3] for t in timings if t[3] is not None) == [1.0]  # only the stream has a ttft
        errors = await stats_repo.recent_errors(db, NOW - 1, 10)
        assert [row["request_id"] for row in errors] == ["req-2"]
        assert await stats_repo.size_bytes(db) > 0
        await stats_repo.sweep_traffic(db, NOW + 3600)
        assert await stats_repo.traffic(db, minute) == []
        assert await requests_repo.sweep(db, NOW + 2) == 3  # req-0, req-1 and req-0's bodies
        assert await requests_repo.count(db) == 3

    run(work)


def test_journal_progress(run: Callable[[Work], Any]) -> None:
    async def work(db: Database) -> None:
        assert await db.write(lambda conn: ledger.progress(conn, "owner")) == 0
        await db.write(lambda conn: ledger.set_progress(conn, "owner", 5))
        await db.write(lambda conn: ledger.set_progress(conn, "owner", 7))
        assert await db.write(lambda conn: ledger.progress(conn, "owner")) == 7
        await db.write(lambda conn: ledger.forget(conn, "owner"))
        assert await db.write(lambda conn: ledger.progress(conn, "owner")) == 0

    run(work)


def file_row(file_id: str, created_at: int, expires_at: int | None = None) -> dict[str, Any]:
    return {"id": file_id, "owner_key_id": "key_a", "filename": f"{file_id}.jsonl", "purpose": "batch",
            "bytes": 10, "sha256": "0" * 64, "created_at": created_at, "expires_at": expires_at}


def test_files_and_batches(run: Callable[[Work], Any], tmp_path: Path, database_url: str | None) -> None:
    async def work(db: Database) -> None:
        for i in range(3):
            await files_repo.insert(db, file_row(f"file-{i}", 100 + i, 150 if i == 0 else None))
        assert (await files_repo.get(db, "file-1", now=200))["filename"] == "file-1.jsonl"
        assert await files_repo.get(db, "file-0", now=200) is None  # expired
        listed = await files_repo.page(db, owner="key_a", purpose="batch", order="asc",
                                       after={"created_at": 100, "id": "file-0"}, limit=5, now=120)
        assert [row["id"] for row in listed] == ["file-1", "file-2"]
        assert await files_repo.stored_bytes(db) == 30
        assert await files_repo.take_expired(db, now=200) == ["file-0"]
        assert await files_repo.delete(db, "file-2") and not await files_repo.delete(db, "file-2")

        assert await batches_repo.take_lease(db, "runner-a", NOW, 30)
        assert not await batches_repo.take_lease(db, "runner-b", NOW + 1, 30)
        assert await batches_repo.take_lease(db, "runner-b", NOW + 31, 30)  # a lease that ran out
        await batches_repo.release_lease(db, "runner-b")
        await batches_repo.create(db, {"id": "batch_1", "owner_key_id": "key_a", "endpoint": "/v1/chat/completions",
                                       "input_file_id": "file-1", "status": "validating", "created_at": 100,
                                       "expires_at": 100 + 86400, "metadata_json": json.dumps({"k": "v"})})
        assert [row["id"] for row in await batches_repo.page(db, owner="key_a", after=None, limit=10)] == ["batch_1"]
        assert await batches_repo.count_active(db, "key_a") == 1
        await batches_repo.insert_requests(db, "batch_1", [(1, "a", "{}"), (2, "b", "{}"), (3, "c", "{}")])
        assert await batches_repo.start(db, "batch_1", total=3, model="chat", now=101)
        claimed = await batches_repo.claim(db, "batch_1", 2, now=102, lease_until=200)
        assert [(row["line"], row["attempts"]) for row in claimed] == [(1, 1), (2, 1)]
        assert await batches_repo.finish(db, "batch_1", 1, 1, ok=True, status_code=200, request_id="r1",
                                         backend="fake", response_json="{}", error_json=None, usage=(3, 0, 2, 0),
                                         now=103)
        assert not await batches_repo.finish(db, "batch_1", 1, 1, ok=True, status_code=200, request_id="r1",
                                             backend="fake", response_json="{}", error_json=None,
                                             usage=(3, 0, 2, 0), now=103)  # counted once
        await batches_repo.give_back(db, "batch_1", [(2, 1)])
        await batches_repo.retry_later(db, "batch_1", 2, 0, not_before=0)
        assert await batches_repo.unfinished(db, "batch_1") == 2
        assert await batches_repo.close_unfinished(db, "batch_1", "cancelled", "{}", now=104) == 2
        await batches_repo.set_finalizing(db, "batch_1", now=105)
        assert await batches_repo.finalize(db, "batch_1", status="completed", stamp="completed_at",
                                           from_statuses=("finalizing",), file_rows=[file_row("file-out", 106)],
                                           output_file_id="file-out", error_file_id=None, now=106)
        batch = await batches_repo.get(db, "batch_1")
        assert batch is not None and (batch["status"], batch["completed"], batch["failed"]) == ("completed", 1, 2)
        assert batch["input_tokens"] == 3 and batch["output_file_id"] == "file-out"
        assert [row["state"] for row in await batches_repo.results(db, "batch_1", 0, 10)] == \
            ["succeeded", "cancelled", "cancelled"]
        assert (await batches_repo.summary(db))["by_status"] == {"completed": 1}
        assert await batches_repo.requeue_running(db) == 0
        assert await batches_repo.purge_lines(db, before=1000) == 3

    run(work)
    conn = connect_sync(tmp_path, database_url)  # the main process's start-up chores
    try:
        assert files_repo.all_ids_sync(conn) == {"file-1", "file-out"}
        batches_repo.clear_lease_sync(conn)
    finally:
        conn.close()


def test_templates(run: Callable[[Work], Any]) -> None:
    fields = {"messages": [{"role": "user", "content": "{{x}}"}], "variables": {"x": {}}, "description": None}

    async def work(db: Database) -> None:
        await templates_repo.create(db, "t1", fields)
        with pytest.raises(templates_repo.Exists):
            await templates_repo.create(db, "t1", fields)
        added = await asyncio.gather(*(templates_repo.add_version(db, "t1", fields) for _ in range(3)))
        assert sorted(added) == [2, 3, 4]  # at once (PostgreSQL: on three connections), three numbers
        with pytest.raises(templates_repo.Missing):
            await templates_repo.add_version(db, "nope", fields)
        assert (await templates_repo.get_version(db, "t1"))["version"] == 4
        assert [v["version"] for v in await templates_repo.versions(db, "t1")] == [1, 2, 3, 4]
        assert [t["id"] for t in await templates_repo.list_all(db)] == ["t1"]
        assert await templates_repo.delete(db, "t1") == 4 and not await templates_repo.exists(db, "t1")

    run(work)


def test_cache_responses_and_image_descriptions(run: Callable[[Work], Any]) -> None:
    async def work(db: Database) -> None:
        for key, created in (("k1", NOW), ("k2", NOW + 1)):
            body = b'{"answer": "\x00bytes"}'
            await cache_repo.put(db, cache_repo.CacheEntry(
                key=key, scope=None, endpoint="chat/completions", model="fake/fake-chat", body=body,
                prompt_tokens=3, completion_tokens=4, estimated=False, size=cache_repo.size_of(body, b"\x01" * 8),
                created_at=created, expires_at=created + 60, context="ctx", vector=b"\x01" * 8))
        found = await cache_repo.get(db, "k1", NOW + 10)
        assert found is not None and bytes(found["body"]) == b'{"answer": "\x00bytes"}' and found[3] == 3
        assert await cache_repo.similar(db, "ctx", NOW, 5) == [("k2", b"\x01" * 8), ("k1", b"\x01" * 8)]
        writer = BufferedWriter(db, 60)
        cache_repo.touch(writer, "k1", NOW + 5)
        vision_repo.put(writer, "img", "desc-1", "a cat", NOW)
        vision_repo.put(writer, "img", "desc-1", "a black cat", NOW + 1)  # replaces
        await writer.flush()
        assert await vision_repo.get(db, "img", "desc-1") == "a black cat"
        stats = await cache_repo.stats(db)
        assert (stats["entries"], stats["hits"]) == (2, 1)
        one = cache_repo.size_of(b'{"answer": "\x00bytes"}', b"\x01" * 8)
        assert await cache_repo.sweep(db, NOW + 30, max_bytes=one) == (0, 1)  # k2, never hit, goes first
        assert await cache_repo.get(db, "k1", NOW + 30) is not None
        assert await cache_repo.sweep(db, NOW + 100, max_bytes=10**9) == (1, 0)

        for rid, expires in (("resp_old", 100.0), ("resp_new", 10_000.0)):
            await responses_repo.save(db, response={"id": rid, "status": "completed", "output": []}, key_id="key_a",
                                      input_items=[{"id": "msg_1"}], conversation=[], created_at=1.0,
                                      expires_at=expires)
        await responses_repo.save(db, response={"id": "resp_new", "status": "incomplete", "output": []},
                                  key_id="key_a", input_items=[], conversation=[], created_at=1.0, expires_at=10_000)
        assert (await responses_repo.get(db, "resp_new", now=500.0))["status"] == "incomplete"
        assert await responses_repo.sweep(db, now=500.0) == 1

    run(work)


def test_two_nodes_creating_keys_at_once_take_distinct_slots(tmp_path: Path, database_url: str | None) -> None:
    migrate_database(tmp_path, database_url, migrations_dir())

    async def main() -> None:
        nodes = [await open_database(tmp_path, DatabaseSettings(url=database_url)) for _ in range(2)]
        try:
            made = await asyncio.gather(*(auth.create_key(nodes[i % 2], {"name": f"k{i}"}, slots=16)
                                          for i in range(8)))
            assert sorted(row["slot"] for row, _ in made) == list(range(8))
            secret = "sk-app-" + "x" * 40  # APPLIANCE_ADMIN_KEY, made by both nodes as they start together
            await asyncio.gather(*(auth.ensure_admin_key(node, secret, slots=16) for node in nodes))
            admins = [row for row in await keys_repo.list_all(nodes[0]) if row["role"] == "admin"]
            assert len(admins) == 1
        finally:
            for node in nodes:
                await node.close()

    asyncio.run(main())
