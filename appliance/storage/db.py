"""SQLite connections for one worker: a reader and a writer (the buffered writer in front of it: writer.py).

Reads use ``execute_fetchall`` (one round trip, no cursor held across an await); writes are
``BEGIN IMMEDIATE`` transactions, one at a time per worker.
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


class DatabaseUnavailable(sqlite3.OperationalError):
    """The database server cannot be reached (PostgreSQL; SQLite, a file, has no such failure)."""


class Database:
    """Two connections per worker: reads never queue behind the writer's transactions.

    With ``[database] url`` set, engine.open_database gives pg.PgDatabase instead: the same interface.
    """

    dialect = "sqlite"

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
