"""SQL for the response cache: entries shared by every worker, swept by age and by size."""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

import aiosqlite

from appliance.storage.db import Database
from appliance.storage.writer import BufferedWriter

# Bytes a row costs beyond its body (key twice with the primary-key index, the other columns, page slack):
# counted in ``size`` so that many tiny answers still respect the size cap.
ROW_OVERHEAD = 256


class CacheEntry(NamedTuple):
    key: str
    scope: str | None
    endpoint: str
    model: str
    body: bytes
    prompt_tokens: int | None
    completion_tokens: int | None
    estimated: bool
    size: int
    created_at: float
    expires_at: float
    context: str | None = None  # the semantic cache's: where the entry may be found by similarity
    vector: bytes | None = None  # and what it is compared by


_PUT = (
    "INSERT INTO response_cache (key, scope, endpoint, model, body, prompt_tokens, completion_tokens, "
    "estimated, size, created_at, expires_at, context, vector, hits, last_hit_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL) "
    "ON CONFLICT (key) DO UPDATE SET scope = excluded.scope, endpoint = excluded.endpoint, model = excluded.model, "
    "body = excluded.body, prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens, "
    "estimated = excluded.estimated, size = excluded.size, created_at = excluded.created_at, "
    "expires_at = excluded.expires_at, context = excluded.context, vector = excluded.vector, hits = 0, "
    "last_hit_at = NULL"  # a new entry in place of the old (INSERT OR REPLACE, which PostgreSQL lacks)
)
_SIMILAR = (
    "SELECT key, vector FROM response_cache WHERE context = ? AND expires_at > ? ORDER BY created_at DESC LIMIT ?"
)
_GET = (
    "SELECT body, created_at, expires_at, prompt_tokens, completion_tokens, estimated FROM response_cache "
    "WHERE key = ? AND expires_at > ?"
)
_TOUCH = "UPDATE response_cache SET hits = hits + 1, last_hit_at = max(coalesce(last_hit_at, 0), ?) WHERE key = ?"
# Keep the most recently used entries whose sizes add up to the cap; everything older goes.
_EVICT = (
    "DELETE FROM response_cache WHERE key IN (SELECT key FROM (SELECT key, sum(size) OVER "
    "(ORDER BY coalesce(last_hit_at, created_at) DESC, key ROWS UNBOUNDED PRECEDING) AS kept "
    "FROM response_cache) AS ranked WHERE kept > ?)"
)


def size_of(body: bytes, vector: bytes | None = None) -> int:
    return len(body) + len(vector or b"") + ROW_OVERHEAD


async def get(db: Database, key: str, now: float) -> sqlite3.Row | None:
    """The live entry under ``key``: (body, created_at, expires_at, prompt_tokens, completion_tokens, estimated)."""
    rows = await db.fetchall(_GET, (key, now))
    return rows[0] if rows else None


async def put(db: Database, entry: CacheEntry) -> None:
    """Store (or replace) an entry at once, so every worker sees it on its next lookup."""

    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute(_PUT, (entry.key, entry.scope, entry.endpoint, entry.model, entry.body,
                                  entry.prompt_tokens, entry.completion_tokens, int(entry.estimated), entry.size,
                                  entry.created_at, entry.expires_at, entry.context, entry.vector))

    await db.write(work)


async def similar(db: Database, context: str, now: float, limit: int) -> list[tuple[str, bytes]]:
    """(key, vector) of the newest ``limit`` live entries stored under ``context``."""
    rows = await db.fetchall(_SIMILAR, (context, now, limit))
    return [(row[0], bytes(row[1])) for row in rows]


def touch(writer: BufferedWriter, key: str, now: float) -> None:
    """Count a hit and mark the entry recently used; written at the next flush."""
    writer.add(_TOUCH, (now, key))


async def sweep(db: Database, now: float, max_bytes: int) -> tuple[int, int]:
    """Delete expired entries, then the least recently used ones until the total size fits in ``max_bytes``.

    Returns (expired, evicted).
    """
    total = await db.fetchall("SELECT coalesce(sum(size), 0) FROM response_cache WHERE expires_at > ?", (now,))
    over = int(total[0][0]) > max_bytes  # read outside the write lock: the full scan holds no one up

    async def work(conn: aiosqlite.Connection) -> tuple[int, int]:
        expired = (await conn.execute("DELETE FROM response_cache WHERE expires_at <= ?", (now,))).rowcount
        evicted = (await conn.execute(_EVICT, (max_bytes,))).rowcount if over else 0
        return expired, evicted

    return await db.write(work)


async def stats(db: Database) -> dict[str, int]:
    """Entries, their bytes (as counted against the cap) and the hits they served."""
    rows = await db.fetchall("SELECT count(*), coalesce(sum(size), 0), coalesce(sum(hits), 0) FROM response_cache")
    entries, size, hits = rows[0]
    return {"entries": int(entries), "bytes": int(size), "hits": int(hits)}

