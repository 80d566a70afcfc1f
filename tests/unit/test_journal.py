"""The journal and the buffered writer: a worker that dies, or a database that refuses writes, loses no entry.

A worker's death is played in process by closing its journal's lock (what the kernel does when it
dies) without a flush; its entries are then only on disk, and another writer ingests them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance.common.config import DatabaseSettings
from appliance.common.resources import migrations_dir
from appliance.storage import ledger
from appliance.storage.db import Database
from appliance.storage.engine import migrate_database, open_database
from appliance.storage.journal import Journal
from appliance.storage.requests_repo import RequestRecord
from appliance.storage.usage_repo import day_of
from appliance.storage.writer import BufferedWriter

NOW = 1_765_000_000.0


def entry(i: int, *, key: str | None = "key_a", status: int = 200, bodies: bool = False) -> ledger.Entry:
    row = RequestRecord(
        request_id=f"req-{i}", created_at=NOW + i, endpoint="/v1/chat/completions", model="chat", backend="fake",
        backend_model="fake-chat", status=status, error_code=None, stream=False, latency_ms=3.5,
        overhead_ms=0.4, ttft_ms=None, prompt_tokens=10, completion_tokens=5, estimated=False, key_id=key,
        cached_tokens=0, input_cost_usd=0.001, output_cost_usd=0.002, cost_usd=0.003, cache=None)
    return ledger.Entry(row, ledger.bodies_of(b'{"a": 1}', b"\x00\xffanswer", 1024) if bodies else None)


Runner = Callable[[Path, Callable[[Path, Database], Awaitable[None]]], None]


@pytest.fixture
def run(database_url: str | None) -> Runner:
    """Runs a test on a migrated database of each engine (SQLite in ``tmp_path``, or PostgreSQL)."""

    def runner(tmp_path: Path, test: Callable[[Path, Database], Awaitable[None]]) -> None:
        migrate_database(tmp_path, database_url, migrations_dir())

        async def main() -> None:
            db = await open_database(tmp_path, DatabaseSettings(url=database_url))
            try:
                await test(tmp_path / "journal", db)
            finally:
                await db.close()

        asyncio.run(main())

    return runner


def die(journal: Journal) -> None:
    """What the kernel does for a killed worker: its lock goes, its files stay."""
    journal.rotate()
    os.close(journal._lock_fd)


async def table(db: Database, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await db.fetchall(sql)]


LEDGER = "SELECT request_id, status, key_id, prompt_tokens, cost_usd FROM requests ORDER BY request_id"
USAGE = "SELECT day, key_id, requests, prompt_tokens, completion_tokens, round(cost_usd, 9) FROM usage_daily"
TRAFFIC = "SELECT minute, backend, requests, tokens FROM traffic_minute ORDER BY minute, backend"


def test_an_entry_is_on_disk_as_soon_as_it_is_added(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        writer = BufferedWriter(db, 60, Journal(folder))
        writer.add_entry(entry(1))
        writer.add_entry(entry(2, bodies=True))
        lines = b"".join(p.read_bytes() for p in folder.glob("*.log")).splitlines()
        assert [ledger.decode(line) for line in lines] == [(1, entry(1)), (2, entry(2, bodies=True))]

    run(tmp_path, test)


def test_a_dead_workers_entries_are_ingested_once_and_count_as_a_flush_would(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        dead = BufferedWriter(db, 60, Journal(folder))
        for i in range(3):
            dead.add_entry(entry(i, bodies=i == 1))
        await dead.flush()  # committed: the survivor must not count these again
        expected_after_flush = await table(db, USAGE)
        for i in range(3, 7):
            dead.add_entry(entry(i, key=None if i == 6 else "key_a", status=429 if i == 5 else 200))
        die(dead._journal)  # type: ignore[arg-type]

        survivor = BufferedWriter(db, 60, Journal(folder))
        assert await survivor.ingest_orphans() == 4
        assert await survivor.ingest_orphans() == 0  # idempotent: the orphan is gone
        assert [r[0] for r in await table(db, LEDGER)] == [f"req-{i}" for i in range(7)]
        assert expected_after_flush == [(day_of(NOW), "key_a", 3, 30, 15, 0.009)]
        assert await table(db, USAGE) == [(day_of(NOW), "key_a", 6, 60, 30, 0.018)]  # req-6 had no key
        minute = int(NOW // 60)
        assert await table(db, TRAFFIC) == [(minute, "", 7, 105), (minute, "fake", 6, 90)]  # the 429 not a backend's
        assert (await table(db, "SELECT count(*) FROM request_bodies"))[0][0] == 1
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            p.name for p in folder.iterdir() if p.name.startswith(survivor._journal.owner))  # type: ignore[union-attr]
        assert await table(db, "SELECT owner FROM journal_progress") == []

    run(tmp_path, test)


def test_a_death_between_commit_and_unlink_counts_nothing_twice(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        dead = BufferedWriter(db, 60, Journal(folder))
        for i in range(4):
            dead.add_entry(entry(i))
        kept = tmp_path / "segments"
        kept.mkdir()
        for segment in folder.glob("*.log"):
            shutil.copy(segment, kept / segment.name)
        await dead.flush()
        for segment in kept.iterdir():  # as if the worker died before deleting them
            shutil.copy(segment, folder / segment.name)
        dead.add_entry(entry(4))
        die(dead._journal)  # type: ignore[arg-type]

        assert await BufferedWriter(db, 60, Journal(folder)).ingest_orphans() == 1
        assert [r[0] for r in await table(db, LEDGER)] == [f"req-{i}" for i in range(5)]

    run(tmp_path, test)


def test_a_live_workers_journal_is_left_alone(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        alive = BufferedWriter(db, 60, Journal(folder))
        alive.add_entry(entry(1))
        assert await BufferedWriter(db, 60, Journal(folder)).ingest_orphans() == 0
        assert await alive.flush() == 1
        assert await table(db, "SELECT count(*) FROM requests") == [(1,)]

    run(tmp_path, test)


def test_failing_writes_keep_every_entry_until_they_work_again(tmp_path: Path, run: Runner,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(folder: Path, db: Database) -> None:
        errors: list[int] = []
        writer = BufferedWriter(db, 60, Journal(folder), on_error=lambda: errors.append(1))
        real_write = db.write

        async def full_disk(work: Any) -> Any:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(db, "write", full_disk)
        for i in range(3):
            writer.add_entry(entry(i))
            assert await writer.flush() == 0
        assert writer.failing_since is not None and len(errors) == 3 and writer.depth == 3
        assert len(list(folder.glob("*.log"))) == 3  # each attempt rotated; all wait

        monkeypatch.setattr(db, "write", real_write)
        writer.add_entry(entry(3))
        assert await writer.flush() == 4
        assert writer.failing_since is None and writer.depth == 0
        assert [r[0] for r in await table(db, LEDGER)] == [f"req-{i}" for i in range(4)]
        assert list(folder.glob("*.log")) == []

    run(tmp_path, test)


def test_a_stop_that_cannot_write_leaves_the_journal_for_the_next_start(tmp_path: Path, run: Runner,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def test(folder: Path, db: Database) -> None:
        writer = BufferedWriter(db, 60, Journal(folder))
        real_write = db.write

        async def read_only(work: Any) -> Any:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        monkeypatch.setattr(db, "write", read_only)
        monkeypatch.setattr(asyncio, "sleep", _no_sleep)
        writer.add_entry(entry(1))
        await writer.stop()
        monkeypatch.setattr(db, "write", real_write)
        assert await BufferedWriter(db, 60, Journal(folder)).ingest_orphans() == 1
        assert [r[0] for r in await table(db, LEDGER)] == ["req-1"]

    run(tmp_path, test)


def test_a_clean_stop_leaves_nothing_behind(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        writer = BufferedWriter(db, 60, Journal(folder))
        writer.add_entry(entry(1))
        await writer.stop()
        assert list(folder.iterdir()) == []
        assert await table(db, "SELECT count(*) FROM requests") == [(1,)]

    run(tmp_path, test)


def test_a_torn_last_line_is_skipped(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        dead = BufferedWriter(db, 60, Journal(folder))
        dead.add_entry(entry(1))
        dead.add_entry(entry(2))
        die(dead._journal)  # type: ignore[arg-type]
        (segment,) = folder.glob("*.log")
        segment.write_bytes(segment.read_bytes()[:-20])  # a power cut mid-line
        assert await BufferedWriter(db, 60, Journal(folder)).ingest_orphans() == 1

    run(tmp_path, test)


def test_unwritable_journal_keeps_entries_in_memory(tmp_path: Path, run: Runner) -> None:
    async def test(folder: Path, db: Database) -> None:
        journal = Journal(folder)
        writer = BufferedWriter(db, 60, journal)
        journal._path = lambda segment: folder / "missing" / f"{segment}.log"  # type: ignore[method-assign]
        writer.add_entry(entry(1))
        assert journal.failing
        assert await writer.flush() == 1
        assert await table(db, "SELECT count(*) FROM requests") == [(1,)]

    run(tmp_path, test)


async def _no_sleep(_seconds: float) -> None:
    return None


def test_a_journal_line_written_before_compute_cost_still_parses_and_counts(tmp_path: Path, run: Runner) -> None:
    # A line from a worker of the previous version: its row ends at batch_id (no compute_cost_usd).
    old = entry(1)
    line = ledger.encode(7, old)
    fields = orjson.loads(line)
    assert fields[-2] is None and len(fields) == len(RequestRecord._fields) + 2  # seq, the row, bodies
    legacy = orjson.dumps([fields[0], *fields[1:-2], fields[-1]]) + b"\n"  # without the last field
    assert ledger.decode(legacy) == (7, old)
    assert old.row.compute_cost_usd is None

    charged = ledger.Entry(old.row._replace(request_id="req-2", compute_cost_usd=0.25))
    assert ledger.decode(ledger.encode(8, charged)) == (8, charged)

    async def test(folder: Path, db: Database) -> None:
        writer = BufferedWriter(db, 60, Journal(folder))
        writer.add_entry(ledger.decode(legacy)[1])
        writer.add_entry(charged)
        await writer.flush()
        assert await table(db, "SELECT request_id, compute_cost_usd FROM requests ORDER BY request_id") == [
            ("req-1", None), ("req-2", 0.25)]
        assert await table(db, "SELECT requests, round(cost_usd, 9), compute_cost_usd FROM usage_daily") == [
            (2, 0.006, 0.25)]

    run(tmp_path, test)
