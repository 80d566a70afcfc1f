"""PostgreSQL for the durable records when ``[database] url`` is set: the same ``Database`` interface as SQLite.

Imported only then (psycopg's import time is not paid by a single appliance). The repos write one SQL for
both engines: the subset the two share (upserts as ``ON CONFLICT ... DO UPDATE`` with table-qualified
columns, ``WHERE TRUE``, comparisons not used as numbers). What remains is mechanical: ``?`` placeholders
become ``%s`` (once per statement, cached), and SQLite's scalar ``round(real, n)`` and two-argument ``max``
exist as small SQL functions in the PostgreSQL schema (migrations/postgresql/0001_init.sql). Where SQL
truly differs, a repo asks ``db.dialect``.

Errors are raised as the DB-API classes of the sqlite3 module (``PgError`` is a ``sqlite3.DatabaseError``,
``PgIntegrityError`` a ``sqlite3.IntegrityError``), so the callers that tolerate a failing database catch
one family whichever engine runs.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.adapt import Dumper, Loader
from psycopg_pool import AsyncConnectionPool

from appliance.common.config import masked_url
from appliance.storage.db import Database, DatabaseUnavailable
from appliance.storage.migrate import SchemaError, known_migrations, newer_database, postgres_sql

T = TypeVar("T")

DIALECT = "postgresql"
WAIT_S = 5.0  # longest wait for a pooled connection
CONNECT_TIMEOUT_S = 5  # libpq's connect_timeout, whole seconds
DOWN_RETRY_S = 1.0  # after an unreachable server, how long reads fail at once before one tries again


class PgError(sqlite3.DatabaseError):
    """A PostgreSQL failure (connection, query), in the family callers already catch."""


class PgIntegrityError(sqlite3.IntegrityError):
    """A constraint said no (unique, check, foreign key)."""


class PgUnavailable(PgError, DatabaseUnavailable):
    """No connection to the server (down, unreachable, the pool's wait ran out)."""


def _wrapped(exc: psycopg.Error) -> sqlite3.Error:
    if isinstance(exc, psycopg.IntegrityError):
        return PgIntegrityError(str(exc))
    if isinstance(exc, psycopg.OperationalError):
        return PgUnavailable(str(exc))
    return PgError(str(exc))


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise _wrapped(exc) from exc


# ------------------------------------------------------------------------------------------ SQL


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite's placeholders as psycopg's (statements are few and fixed: cached). A literal % is doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


# ------------------------------------------------------------------------------------------ rows


class Row(tuple):  # type: ignore[type-arg]
    """A result row read like sqlite3.Row: by index, by column name, and ``dict(row)``."""

    __slots__ = ()
    _names: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_names": {name: i for i, name in enumerate(names)}})


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    names = tuple(column.name for column in cursor.description or ())
    cls = _row_class(names)
    return lambda values: cls(values)


class _IntFromBool(Dumper):
    """SQLite's booleans are integers: a Python bool goes into an INTEGER column as 0 or 1."""

    oid = psycopg.postgres.types["int8"].oid

    def dump(self, obj: bool) -> bytes:
        return b"1" if obj else b"0"


class _NumberFromNumeric(Loader):
    """sum() of integers is NUMERIC in PostgreSQL: an int (or a float) as SQLite gives, never a Decimal."""

    def load(self, data: Any) -> int | float:
        text = bytes(data).decode()
        try:
            return int(text)
        except ValueError:
            return float(text)


def _configure(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> None:
    conn.adapters.register_dumper(bool, _IntFromBool)
    conn.adapters.register_loader("numeric", _NumberFromNumeric)
    conn.row_factory = _row_factory  # type: ignore[assignment]


async def _configure_async(conn: psycopg.AsyncConnection[Any]) -> None:
    _configure(conn)


# ------------------------------------------------------------------------------------------ connections


class Cursor:
    """What the repos read of an executed statement: its rows and ``rowcount``."""

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    async def fetchall(self) -> list[Row]:
        return self._rows

    async def fetchone(self) -> Row | None:
        return self._rows[0] if self._rows else None


class Connection:
    """The writer's connection inside ``write``: the part of aiosqlite's Connection the repos use."""

    dialect = DIALECT

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> Cursor:
        with _errors():
            cursor = await self._conn.execute(translate(sql), tuple(params))
            rows = await cursor.fetchall() if cursor.description else []
        return Cursor(rows, cursor.rowcount)

    async def execute_fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return await (await self.execute(sql, params)).fetchall()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        rows = [tuple(row) for row in rows]
        if not rows:
            return Cursor([], 0)
        with _errors():
            async with self._conn.cursor() as cursor:
                await cursor.executemany(translate(sql), rows)
                return Cursor([], cursor.rowcount)


class PgDatabase(Database):
    """A pool of ``[database] pool_size`` connections per worker; ``write`` is one transaction on one of them."""

    dialect = DIALECT

    def __init__(self, url: str, pool: AsyncConnectionPool) -> None:
        self.path = None  # type: ignore[assignment]
        self.url = url
        self._pool = pool
        self._down_until = 0.0  # monotonic time until which reads fail at once (the server was unreachable)

    @classmethod
    async def connect(cls, url: str, pool_size: int) -> PgDatabase:  # type: ignore[override]
        # Bounded waits: with the database down, a read fails after WAIT_S instead of holding its request for
        # the pool's default 30 s (the writer's rows wait in memory and the journal meanwhile).
        pool = AsyncConnectionPool(url, min_size=1, max_size=pool_size, open=False, configure=_configure_async,
                                   kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                                   timeout=WAIT_S, name="appliance")
        with _errors():
            await pool.open(wait=True, timeout=10)
        return cls(url, pool)

    async def close(self) -> None:
        await self._pool.close()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:  # type: ignore[override]
        """Reads are on request paths: for DOWN_RETRY_S after the server was found unreachable they fail at
        once rather than each wait for a pooled connection (the writer's flushes go on trying)."""
        if self._down_until and time.monotonic() < self._down_until:
            raise PgUnavailable("PostgreSQL is unreachable (tried again shortly)")
        try:
            with _errors():
                async with self._pool.connection() as conn:
                    cursor = await conn.execute(translate(sql), tuple(params))
                    rows = await cursor.fetchall()
        except PgUnavailable:
            self._down_until = time.monotonic() + DOWN_RETRY_S
            raise
        self._down_until = 0.0
        return rows

    async def write(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction (READ COMMITTED; the repos' statements are each atomic)."""
        try:
            async with self._transaction() as conn:
                result = await work(Connection(conn))
        except PgUnavailable:
            self._down_until = time.monotonic() + DOWN_RETRY_S
            raise
        self._down_until = 0.0
        return result

    @asynccontextmanager
    async def _transaction(self) -> Any:
        with _errors():
            async with self._pool.connection() as conn, conn.transaction():
                yield conn


# ------------------------------------------------------------------------------------------ start-time, sync


def connect_sync(url: str) -> psycopg.Connection[Any]:
    """A plain connection for the main process (migrations, start-up chores), closed before workers fork."""
    with _errors():
        conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    _configure(conn)
    return conn


def execute_sync(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> list[Row]:
    with _errors():
        cursor = conn.execute(translate(sql), tuple(params))  # type: ignore[call-overload]
        return cursor.fetchall() if cursor.description else []


class SyncConnection:
    """sqlite3's ``conn.execute(sql, params)`` shape over a psycopg connection, for the start-up helpers."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return execute_sync(self._conn, sql, params)

    def close(self) -> None:
        self._conn.close()


def server_version(conn: psycopg.Connection[Any]) -> str:
    number = conn.info.server_version  # e.g. 150018
    return f"{number // 10000}.{number % 10000}"


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
        with _errors():
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            try:
                return _apply(conn, files, masked_url(url))
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    except sqlite3.Error as exc:
        raise SchemaError(f"{masked_url(url)}: {exc}") from exc
    finally:
        conn.close()


def _apply(conn: psycopg.Connection[Any], files: list[Path], where: str) -> list[str]:
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    applied = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    unknown = sorted(applied - {p.name for p in files})
    if unknown:
        raise newer_database(where, unknown)
    done = []
    for path in files:
        if path.name in applied:
            continue
        with conn.transaction():
            conn.execute(postgres_sql(path).encode())  # no parameters: the file's text as it is
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES "
                         "(%s, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'))", (path.name,))
        done.append(path.name)
    return done


def applied_migrations(url: str) -> list[str]:
    """The migrations recorded in the database (none when it was never migrated)."""
    conn = connect_sync(url)
    try:
        with _errors():
            if conn.execute("SELECT to_regclass('_migrations')").fetchone()[0] is None:  # type: ignore[index]
                return []
            return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    finally:
        conn.close()
