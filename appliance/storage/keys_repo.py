"""SQL for API keys and the install secret their hashes are keyed with."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from typing import Any

import aiosqlite
import orjson

from appliance.storage.db import Database

# Columns a caller may change after creation (the hash and slot change only through rotate/create).
EDITABLE = ("name", "role", "models", "endpoints", "expires_at", "enabled", "rpm", "tpm", "max_concurrent",
            "budget_usd", "budget_tokens", "budget_period", "budget_counts", "weight", "metadata",
            "guardrails")
_JSON = ("models", "endpoints", "metadata", "upstream_keys", "guardrails")


class NoFreeSlot(Exception):
    """Every live-counter slot is taken by a key."""


class DuplicateKey(Exception):
    """A key with this hash exists (another node created the same APPLIANCE_ADMIN_KEY at the same moment)."""


# Several nodes on one PostgreSQL may pick the same free slot at once: the slot is UNIQUE, so all but one
# insert fails and tries the next free slot. (SQLite's BEGIN IMMEDIATE never lets two pick at once.)
SLOT_TRIES = 8


def _decode(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    data = dict(row)
    for column in _JSON:
        if data.get(column) is not None:
            data[column] = orjson.loads(data[column])
    data["enabled"] = bool(data["enabled"])
    if "guardrails" in data and data["guardrails"] is None:
        data["guardrails"] = []  # keys made before migration 0012
    return data


def _encode(column: str, value: Any) -> Any:
    if column in _JSON and value is not None:
        return orjson.dumps(value).decode()
    if column == "enabled":
        return int(bool(value))
    return value


async def install_secret(db: Database) -> bytes:
    rows = await db.fetchall("SELECT secret FROM install WHERE id = 1")
    return bytes(rows[0][0])


async def find_by_hash(db: Database, key_hash: str) -> dict[str, Any] | None:
    rows = await db.fetchall("SELECT * FROM api_keys WHERE hash = ?", (key_hash,))
    return _decode(rows[0]) if rows else None


async def get(db: Database, key_id: str) -> dict[str, Any] | None:
    rows = await db.fetchall("SELECT * FROM api_keys WHERE id = ?", (key_id,))
    return _decode(rows[0]) if rows else None


async def list_all(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetchall("SELECT * FROM api_keys ORDER BY created_at, id")
    return [_decode(row) for row in rows]  # type: ignore[misc]


async def count(db: Database) -> int:
    rows = await db.fetchall("SELECT count(*) FROM api_keys")
    return int(rows[0][0])


_FREE_SLOT = """
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM api_keys WHERE slot = 0) THEN 0
            ELSE (SELECT min(slot) + 1 FROM api_keys AS a
                  WHERE NOT EXISTS (SELECT 1 FROM api_keys AS b WHERE b.slot = a.slot + 1)) END
"""


async def create(db: Database, values: dict[str, Any], *, slots: int) -> dict[str, Any]:
    """Insert a key (``values`` holds id, hash, prefix and EDITABLE columns) in the lowest free slot."""

    async def work(conn: aiosqlite.Connection) -> None:
        rows = await conn.execute_fetchall(_FREE_SLOT)
        slot = int(next(iter(rows))[0])
        if slot >= slots:
            raise NoFreeSlot(f"all {slots} key slots are taken; raise limits.key_slots or delete unused keys")
        now = time.time()
        row = {column: _encode(column, value) for column, value in values.items()}
        row.update(slot=slot, created_at=now, updated_at=now)
        names = ", ".join(row)
        await conn.execute(f"INSERT INTO api_keys ({names}) VALUES ({', '.join('?' * len(row))})",
                           tuple(row.values()))

    for attempt in range(SLOT_TRIES):
        try:
            await db.write(work)
            break
        except sqlite3.IntegrityError:
            if await find_by_hash(db, values["hash"]) is not None:
                raise DuplicateKey(values["prefix"]) from None
            if attempt == SLOT_TRIES - 1:
                raise
    created = await get(db, values["id"])
    assert created is not None
    return created


async def update(db: Database, key_id: str, changes: dict[str, Any],
                 upstream_keys: Mapping[str, str | None] | None = None) -> dict[str, Any] | None:
    """Change EDITABLE columns (and, for rotation, hash and prefix).

    ``upstream_keys``: sealed credentials to set (backend -> token) or remove (backend -> None), merged
    into the stored ones in the same transaction, so two changes to different backends both stay.
    """
    allowed = {*EDITABLE, "hash", "prefix"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    if changes or upstream_keys:
        assignments = "".join(f"{column} = ?, " for column in changes)
        params = (*(_encode(c, v) for c, v in changes.items()), time.time(), key_id)

        async def work(conn: aiosqlite.Connection) -> None:
            await conn.execute(f"UPDATE api_keys SET {assignments}updated_at = ? WHERE id = ?", params)
            if upstream_keys:
                rows = list(await conn.execute_fetchall("SELECT upstream_keys FROM api_keys WHERE id = ?",
                                                        (key_id,)))
                if rows:
                    stored = merged(orjson.loads(rows[0][0]), upstream_keys)
                    await conn.execute("UPDATE api_keys SET upstream_keys = ? WHERE id = ?",
                                       (orjson.dumps(stored).decode(), key_id))

        await db.write(work)
    return await get(db, key_id)


def merged(stored: dict[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """``stored`` with ``changes`` applied: a token sets or replaces, None removes."""
    out = {**stored, **{name: token for name, token in changes.items() if token is not None}}
    return {name: token for name, token in out.items() if changes.get(name, token) is not None}


async def delete(db: Database, key_id: str) -> bool:
    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
        return cursor.rowcount

    return bool(await db.write(work))
