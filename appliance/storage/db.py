"""SQLite connections for one worker: a reader, a writer, and the buffered writer in front of it.

The request path never waits on the disk: rows go into an in-memory buffer that one task per
worker flushes every ``flush_interval`` in a single ``BEGIN IMMEDIATE`` transaction, and a final time
when the worker stops. Reads use ``execute_fetchall`` (one round trip, no cursor held across an await).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

log = logging.getLogger("appliance.storage")

T = TypeVar("T")

_PRAGMAS = ("PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000", "PRAGMA foreign_keys=ON")


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    for pragma in _PRAGMAS:
        await conn.execute(pragma)
    return conn


class Database:
    """Two connections per worker: reads never queue behind the writer's transactions."""

    def __init__(self, path: Path, reader: aiosqlite.Connection, writer: aiosqlite.Connection) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Database:
        reader = await _connect(path)
        writer = await _connect(path)
        return cls(path, reader, writer)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._reader.execute_fetchall(sql, tuple(params)))

    async def write(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run ``work`` in one BEGIN IMMEDIATE transaction on the writer connection."""
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = await work(self._writer)
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            await self._writer.execute("COMMIT")
            return result


class BufferedWriter:
    """Collects rows on the hot path (no await, no I/O) and writes them in batches."""

    def __init__(self, db: Database, interval_s: float, on_flush: Callable[[int], None] | None = None) -> None:
        self._db = db
        self._interval_s = interval_s
        self._on_flush = on_flush  # told the rows waiting at each periodic flush (the queue depth metric)
        self._pending: dict[str, list[tuple[Any, ...]]] = {}
        self._sums: dict[str, dict[tuple[Any, ...], list[float]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def depth(self) -> int:
        return sum(len(rows) for rows in self._pending.values()) + sum(len(s) for s in self._sums.values())

    def add(self, sql: str, row: tuple[Any, ...]) -> None:
        rows = self._pending.get(sql)
        if rows is None:
            self._pending[sql] = [row]
        else:
            rows.append(row)

    def add_sum(self, sql: str, key: tuple[Any, ...], values: tuple[float, ...]) -> None:
        """Add ``values`` to the totals under ``key``; flushed as one (*key, *totals) row per key.

        For rollups: a thousand requests to one model in a flush interval become one upsert.
        """
        sums = self._sums.setdefault(sql, {})
        totals = sums.get(key)
        if totals is None:
            sums[key] = list(values)
        else:
            for i, value in enumerate(values):
                totals[i] += value

    async def flush(self) -> int:
        for sql, sums in self._sums.items():
            self._pending.setdefault(sql, []).extend((*key, *totals) for key, totals in sums.items())
        self._sums = {}
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}  # swap before the first await

        async def work(conn: aiosqlite.Connection) -> None:
            for sql, rows in batch.items():
                await conn.executemany(sql, rows)

        try:
            await self._db.write(work)
        except (sqlite3.Error, ValueError) as exc:
            log.error("database flush failed, will retry: %s", exc)
            for sql, rows in batch.items():  # keep them for the next attempt, oldest first
                self._pending[sql] = rows + self._pending.get(sql, [])
            return 0
        return sum(len(rows) for rows in batch.values())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="buffered-writer")

    async def _run(self) -> None:
        # Never cancelled mid-flush (that would roll back a swapped-out batch): stop() sets an event.
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            except TimeoutError:
                pass
            if self._on_flush is not None:
                self._on_flush(self.depth)
            await self.flush()

    async def stop(self) -> None:
        """Stop the periodic task and write what is left."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        for _ in range(3):
            await self.flush()
            if not self._pending:
                return
            await asyncio.sleep(0.2)
        log.error("dropping %d unwritten rows at shutdown", self.depth)


def backup(source: Path, target: str | Path) -> None:
    """An online, consistent copy of the database (SQLite's backup API), safe while workers write."""
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists; choose a new file name")
    src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst, pages=1024)  # in steps, so writers are not held off for the whole copy
        finally:
            dst.close()
    finally:
        src.close()
