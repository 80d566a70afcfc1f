"""SQL for file metadata (the bytes live on disk; see appliance/batches/files.py)."""

from __future__ import annotations

from typing import Any

import aiosqlite

from appliance.storage.db import Database

_COLUMNS = "id, owner_key_id, filename, purpose, bytes, sha256, created_at, expires_at, status"
_INSERT = f"INSERT INTO files ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def row_values(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["id"], row["owner_key_id"], row["filename"], row["purpose"], row["bytes"], row["sha256"],
            row["created_at"], row["expires_at"], row.get("status", "processed"))


async def insert(db: Database, row: dict[str, Any]) -> None:
    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute(_INSERT, row_values(row))

    await db.write(work)


async def insert_in(conn: aiosqlite.Connection, row: dict[str, Any]) -> None:
    """Inside another write transaction (a batch's output files and its final status, together)."""
    await conn.execute(_INSERT, row_values(row))


def _live(now: int) -> tuple[str, tuple[Any, ...]]:
    return "(expires_at IS NULL OR expires_at > ?)", (now,)


async def get(db: Database, file_id: str, now: int) -> dict[str, Any] | None:
    live, args = _live(now)
    rows = await db.fetchall(f"SELECT {_COLUMNS} FROM files WHERE id = ? AND {live}", (file_id, *args))
    return dict(rows[0]) if rows else None


async def page(db: Database, *, owner: str | None, purpose: str | None, order: str, after: dict[str, Any] | None,
               limit: int, now: int) -> list[dict[str, Any]]:
    """Up to ``limit + 1`` files (the extra one tells has_more), by created_at then id, ``order`` asc/desc."""
    live, args = _live(now)
    where, params = [live], list(args)
    if owner is not None:
        where.append("owner_key_id = ?")
        params.append(owner)
    if purpose is not None:
        where.append("purpose = ?")
        params.append(purpose)
    direction = "ASC" if order == "asc" else "DESC"
    if after is not None:
        where.append(f"(created_at, id) {'>' if order == 'asc' else '<'} (?, ?)")
        params += [after["created_at"], after["id"]]
    rows = await db.fetchall(
        f"SELECT {_COLUMNS} FROM files WHERE {' AND '.join(where)} "
        f"ORDER BY created_at {direction}, id {direction} LIMIT ?", (*params, limit + 1))
    return [dict(row) for row in rows]


async def delete(db: Database, file_id: str) -> bool:
    async def work(conn: aiosqlite.Connection) -> bool:
        cursor = await conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return cursor.rowcount > 0

    return await db.write(work)


async def stored_bytes(db: Database) -> int:
    rows = await db.fetchall("SELECT coalesce(sum(bytes), 0) FROM files")
    return int(rows[0][0])


async def take_expired(db: Database, now: int) -> list[str]:
    """Delete the rows of expired files and return their ids (the caller removes their bytes after)."""
    async def work(conn: aiosqlite.Connection) -> list[str]:
        rows = await conn.execute_fetchall(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT 1000", (now,))
        ids = [row[0] for row in rows]
        await conn.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in ids])
        return ids

    return await db.write(work)


def all_ids_sync(conn: Any) -> set[str]:
    """Every file id (a plain sqlite3 connection: used at start, before the workers)."""
    return {row[0] for row in conn.execute("SELECT id FROM files")}
