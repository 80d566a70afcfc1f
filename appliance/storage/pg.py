"""PostgreSQL for the durable records when ``[database] url`` is set: the same ``Database`` interface as SQLite.

Over asyncpg, imported only then. asyncpg rather than psycopg: it speaks PostgreSQL's protocol itself (no libpq,
libssl, libcrypto, Kerberos and LDAP beside it: +0.8 MB in the one-file binary instead of +4.2 MB, unpacked at
every start) and its batched inserts, the ledger's writes, took a third to a half of psycopg's CPU
(tests/perf/README.md).

The repos write one SQL for both engines: the subset the two share (upserts as ``ON CONFLICT ... DO UPDATE``
with table-qualified columns, ``WHERE TRUE``, comparisons not used as numbers). What remains is mechanical:
``?`` placeholders become ``$1, $2...`` (once per statement, cached), SQLite's scalar ``round(real, n)`` and
two-argument ``max`` exist as small SQL functions in the PostgreSQL schema (migrations/postgresql/0001_init.sql),
and the numbers and text go through text codecs that take what SQLite takes (a bool or a float in an integer
column, a number in a text one) and give back what SQLite gives (an int or a float for a sum, never a Decimal).

Errors are raised as the DB-API classes of the sqlite3 module (``PgError`` is a ``sqlite3.DatabaseError``,
``PgIntegrityError`` a ``sqlite3.IntegrityError``), so the callers that tolerate a failing database catch
one family whichever engine runs.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from appliance.common.config import masked_url
from appliance.storage.db import Database, DatabaseUnavailable
from appliance.storage.migrate import SchemaError, known_migrations, newer_database, postgres_sql

T = TypeVar("T")

DIALECT = "postgresql"
WAIT_S = 5.0  # longest wait for a pooled connection
CONNECT_TIMEOUT_S = 5.0
DOWN_RETRY_S = 1.0  # after an unreachable server, how long reads fail at once before one tries again


class PgError(sqlite3.DatabaseError):
    """A PostgreSQL failure (connection, query), in the family callers already catch."""


class PgIntegrityError(sqlite3.IntegrityError):
    """A constraint said no (unique, check, foreign key)."""


class PgUnavailable(PgError, DatabaseUnavailable):
    """No connection to the server (down, unreachable, the pool's wait ran out)."""


_UNREACHABLE = (OSError, TimeoutError, asyncio.TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError,
                asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.TooManyConnectionsError,
                asyncpg.exceptions.ConnectionFailureError, asyncpg.exceptions.AdminShutdownError,
                asyncpg.exceptions.InterfaceError)


def _wrapped(exc: BaseException) -> sqlite3.Error:
    if isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        return PgIntegrityError(str(exc))
    if isinstance(exc, _UNREACHABLE):
        return PgUnavailable(f"{type(exc).__name__}: {exc}")
    return PgError(f"{type(exc).__name__}: {exc}")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (asyncpg.PostgresError, *_UNREACHABLE) as exc:
        raise _wrapped(exc) from exc


# ------------------------------------------------------------------------------------------ SQL

_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite's ``?`` placeholders as PostgreSQL's ``$n`` (statements are few and fixed: cached)."""
    count = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)


def _integer(value: Any) -> str:
    return str(int(value))  # bool, float and digit strings too, as SQLite stores them in an INTEGER column


def _number(text: str) -> int | float:
    """sum() of integers is NUMERIC in PostgreSQL: an int (or a float) as SQLite gives, never a Decimal."""
    try:
        return int(text)
    except ValueError:
        return float(text)


_CODECS: tuple[tuple[str, Callable[[Any], str], Callable[[str], Any]], ...] = (
    ("int2", _integer, int), ("int4", _integer, int), ("int8", _integer, int),
    ("float4", lambda v: repr(float(v)), float), ("float8", lambda v: repr(float(v)), float),
    ("numeric", lambda v: repr(float(v)) if isinstance(v, float) else str(v), _number),
    ("text", str, str), ("varchar", str, str),
)


async def _configure(conn: asyncpg.Connection) -> None:
    for name, encode, decode in _CODECS:
        await conn.set_type_codec(name, schema="pg_catalog", encoder=encode, decoder=decode, format="text")


# ------------------------------------------------------------------------------------------ connections


class Cursor:
    """What the repos read of an executed statement: its rows and ``rowcount``."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    async def fetchall(self) -> list[Any]:
        return self.rows

    async def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None


def _rowcount(status: str | None) -> int:
    """'UPDATE 3', 'INSERT 0 1', 'DELETE 0' -> the count; -1 when the command says none (as DB-API does)."""
    last = (status or "").rpartition(" ")[2]
    return int(last) if last.isdigit() else -1


_ROWS = re.compile(r"^\s*(SELECT|WITH)\b|\bRETURNING\b", re.I)


@functools.lru_cache(maxsize=1024)
def _returns_rows(sql: str) -> bool:
    return bool(_ROWS.search(sql))


async def _run(conn: Any, sql: str, params: Iterable[Any]) -> Cursor:
    """One statement on asyncpg's cached prepared statements: rows when it returns them, else its rowcount."""
    with _errors():
        if _returns_rows(sql):
            rows = await conn.fetch(translate(sql), *params)
            return Cursor(rows, len(rows))
        return Cursor([], _rowcount(await conn.execute(translate(sql), *params)))


class Connection:
    """The writer's connection inside ``write``: the part of aiosqlite's Connection the repos use."""

    dialect = DIALECT

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> Cursor:
        return await _run(self._conn, sql, params)

    async def execute_fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        return await (await self.execute(sql, params)).fetchall()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        rows = [tuple(row) for row in rows]
        if rows:
            with _errors():
                await self._conn.executemany(translate(sql), rows)
        return Cursor([], len(rows))


class PgDatabase(Database):
    """A pool of ``[database] pool_size`` connections per worker; ``write`` is one transaction on one of them."""

    dialect = DIALECT

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self.path = None  # type: ignore[assignment]
        self.url = url
        self._pool = pool
        self._down_until = 0.0  # monotonic time until which reads fail at once (the server was unreachable)

    @classmethod
    async def connect(cls, url: str, pool_size: int) -> PgDatabase:  # type: ignore[override]
        with _errors():
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, init=_configure,
                                             timeout=CONNECT_TIMEOUT_S)
        return cls(url, pool)

    async def close(self) -> None:
        await self._pool.close()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:  # type: ignore[override]
        """Reads are on request paths: for DOWN_RETRY_S after the server was found unreachable they fail at
        once rather than each wait for a pooled connection (the writer's flushes go on trying)."""
        if self._down_until and time.monotonic() < self._down_until:
            raise PgUnavailable("PostgreSQL is unreachable (tried again shortly)")
        try:
            with _errors():
                async with self._pool.acquire(timeout=WAIT_S) as conn:
                    rows = await conn.fetch(translate(sql), *params)
        except PgUnavailable:
            self._down_until = time.monotonic() + DOWN_RETRY_S
            raise
        self._down_until = 0.0
        return list(rows)

    async def write(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction (READ COMMITTED; the repos' statements are each atomic)."""
        try:
            with _errors():
                async with self._pool.acquire(timeout=WAIT_S) as conn, conn.transaction():
                    result = await work(Connection(conn))
        except PgUnavailable:
            self._down_until = time.monotonic() + DOWN_RETRY_S
            raise
        self._down_until = 0.0
        return result


# ------------------------------------------------------------------------------------------ start-time, sync


class SyncConnection:
    """sqlite3's ``conn.execute(sql, params)`` shape over one asyncpg connection on a private event loop, for the
    main process's start-up chores and the CLI (closed before the workers fork: nothing crosses it)."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            with _errors():
                self._conn = self._block(asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S))
            self._block(_configure(self._conn))
        except BaseException:
            self._loop.close()
            raise

    def _block(self, work: Awaitable[T]) -> T:
        """Run ``work`` on this connection's loop; from a thread of its own when the caller's thread runs a loop
        already (async code that calls a start-up chore: a test, a CLI command)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(work)
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(self._loop.run_until_complete, work).result()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._block(_run(self._conn, sql, params)).rows

    def script(self, sql: str) -> None:
        """A whole file of statements, no parameters (a migration)."""
        with _errors():
            self._block(self._conn.execute(sql))

    @property
    def server_version(self) -> str:
        version = self._conn.get_server_version()
        return f"{version.major}.{version.minor}"

    def close(self) -> None:
        try:
            self._block(self._conn.close(timeout=5))
        except Exception:  # closing what may already be gone
            pass
        finally:
            self._loop.close()


def connect_sync(url: str) -> SyncConnection:
    return SyncConnection(url)


# ------------------------------------------------------------------------------------------ migrations

# pg_advisory_lock key of the migrations: nodes starting together apply them once, one after the other.
MIGRATION_LOCK = 0x6170706C  # "appl"


def migrate(url: str, folder: Path) -> list[str]:
    """Apply pending migrations in order, each in its own transaction, under the advisory lock; returns the
    names applied. Refuses a database that has migrations this code does not know."""
    files = known_migrations(folder)
    try:
        conn = connect_sync(url)
    except sqlite3.Error as exc:
        raise SchemaError(f"{masked_url(url)}: {exc}") from exc
    try:
        conn.execute("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
        try:
            return _apply(conn, files, masked_url(url))
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))
    except sqlite3.Error as exc:
        raise SchemaError(f"{masked_url(url)}: {exc}") from exc
    finally:
        conn.close()


def _apply(conn: SyncConnection, files: list[Path], where: str) -> list[str]:
    conn.script("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    applied = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    unknown = sorted(applied - {p.name for p in files})
    if unknown:
        raise newer_database(where, unknown)
    done = []
    for path in files:
        if path.name in applied:
            continue
        name = path.name.replace("'", "''")
        conn.script(f"BEGIN;\n{postgres_sql(path)}\n;INSERT INTO _migrations (name, applied_at) VALUES "
                    f"('{name}', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'));\nCOMMIT;")
        done.append(path.name)
    return done


def applied_migrations(url: str) -> list[str]:
    """The migrations recorded in the database (none when it was never migrated)."""
    conn = connect_sync(url)
    try:
        if conn.execute("SELECT to_regclass('_migrations')::text")[0][0] is None:
            return []
        return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    finally:
        conn.close()
