"""SQL behind /statsz: today's rollups, the per-minute traffic rollup, and a bounded sample of the request log."""

from __future__ import annotations

import os
from typing import Any

from appliance.storage.db import Database

NO_LIMIT = 2**62  # LIMIT -1 is SQLite's "no limit"; PostgreSQL refuses a negative one

# A request that failed: an error status, or a stream that ended in an error event after its 200.
_FAILED = "(status >= 400 OR error_code IS NOT NULL)"


async def models_on(db: Database, day: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Per requested model, that UTC day's totals (from the rollups), busiest first (None: all)."""
    rows = await db.fetchall(
        "SELECT model, sum(requests) AS requests, sum(errors) AS errors, sum(prompt_tokens) AS prompt_tokens, "
        "sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens, "
        "round(sum(cost_usd), 9) AS cost_usd, round(sum(compute_cost_usd), 9) AS compute_cost_usd, "
        "sum(cache_hits) AS cache_hits FROM usage_daily WHERE day = ? "
        "GROUP BY model ORDER BY requests DESC, model LIMIT ?", (day, NO_LIMIT if limit is None else limit))
    return [dict(row) for row in rows]


TRAFFIC = ("INSERT INTO traffic_minute (minute, backend, requests, errors, tokens) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (minute, backend) DO UPDATE SET requests = traffic_minute.requests + excluded.requests, "
            "errors = traffic_minute.errors + excluded.errors, tokens = traffic_minute.tokens + excluded.tokens")



async def traffic(db: Database, first_minute: int) -> list[dict[str, Any]]:
    """Every request, per minute from ``first_minute`` on (minutes without traffic are absent)."""
    rows = await db.fetchall(
        "SELECT minute, requests, errors, tokens FROM traffic_minute WHERE backend = '' AND minute >= ? "
        "ORDER BY minute", (first_minute,))
    return [dict(row) for row in rows]


async def backend_counts(db: Database, first_minute: int) -> dict[str, tuple[int, int]]:
    """{backend: (requests, errors)} from ``first_minute`` on."""
    rows = await db.fetchall(
        "SELECT backend, sum(requests), sum(errors) FROM traffic_minute WHERE minute >= ? AND backend != '' "
        "GROUP BY backend", (first_minute,))
    return {row[0]: (int(row[1]), int(row[2])) for row in rows}


# The newest first through the created_at index: a read costs its LIMIT in rows, whatever the traffic.
TIMINGS = ("SELECT backend, backend_model, latency_ms, CASE WHEN stream != 0 THEN ttft_ms END FROM requests "
           "WHERE created_at >= ? AND backend IS NOT NULL AND latency_ms IS NOT NULL "
           "AND (cache IS NULL OR cache NOT IN ('HIT', 'HIT-SEMANTIC')) AND status != 429 "
           "ORDER BY created_at DESC LIMIT ?")


async def backend_timings(db: Database, since: float, limit: int) -> list[tuple[str, str | None, float, float | None]]:
    """(backend, backend model, latency ms, time to first token ms of a stream) of the newest ``limit``
    requests a backend answered since ``since``; the ttft is None for whole answers.

    Not cache hits (the backend never saw them) nor 429s: the gateway's own limits refuse before any
    backend is asked, and a backend's own 429 says it is up, as the circuit breaker sees it too.
    """
    rows = await db.fetchall(TIMINGS, (since, limit))
    return [(row[0], row[1], row[2], row[3]) for row in rows]


async def sweep_traffic(db: Database, older_than: float) -> None:
    minute = int(older_than // 60)
    await db.write(lambda conn: conn.execute("DELETE FROM traffic_minute WHERE minute < ?", (minute,)))


async def recent_errors(db: Database, since: float, limit: int) -> list[dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT created_at AS time, request_id, endpoint, model, backend, status, error_code FROM requests "
        f"WHERE created_at >= ? AND {_FAILED} ORDER BY created_at DESC LIMIT ?", (since, limit))
    return [dict(row) for row in rows]


async def size_bytes(db: Database) -> int:
    """The database on disk: SQLite's file plus its write-ahead log, or PostgreSQL's database size."""
    if db.dialect != "sqlite":
        rows = await db.fetchall("SELECT pg_database_size(current_database())")
        return int(rows[0][0])
    total = 0
    for name in (str(db.path), f"{db.path}-wal"):
        try:
            total += os.stat(name).st_size
        except FileNotFoundError:
            pass
    return total
