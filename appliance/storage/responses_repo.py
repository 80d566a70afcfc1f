"""SQL for stored Responses."""

from __future__ import annotations

from typing import Any

import aiosqlite
import orjson

from appliance.storage.db import Database


async def save(db: Database, *, response: dict[str, Any], key_id: str | None, input_items: list[dict[str, Any]],
               conversation: list[dict[str, Any]], created_at: float, expires_at: float) -> None:
    """Written at once (not buffered): the client may continue from it on another worker right away."""
    row = (response["id"], key_id, created_at, expires_at, response.get("status", "completed"),
           orjson.dumps(input_items).decode(), orjson.dumps(conversation).decode(), orjson.dumps(response).decode())

    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute("INSERT INTO responses (id, key_id, created_at, expires_at, status, input_items, "
                           "conversation, response) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                           "SET key_id = excluded.key_id, created_at = excluded.created_at, "
                           "expires_at = excluded.expires_at, status = excluded.status, "
                           "input_items = excluded.input_items, conversation = excluded.conversation, "
                           "response = excluded.response", row)

    await db.write(work)


async def get(db: Database, response_id: str, now: float) -> dict[str, Any] | None:
    rows = await db.fetchall("SELECT * FROM responses WHERE id = ? AND expires_at > ?", (response_id, now))
    if not rows:
        return None
    row = dict(rows[0])
    for column in ("input_items", "conversation", "response"):
        row[column] = orjson.loads(row[column])
    return row


async def delete(db: Database, response_id: str) -> bool:
    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cursor.rowcount

    return bool(await db.write(work))


async def sweep(db: Database, now: float) -> int:
    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
        return cursor.rowcount

    return int(await db.write(work))
