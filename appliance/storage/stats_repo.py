"""SQL behind /statsz: today's rollups, and short windows of the request log (indexed by created_at)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from appliance.storage.db import Database

# A request that failed: an error status, or a stream that ended in an error event after its 200.
_FAILED = "(status >= 400 OR error_code IS NOT NULL)"


async def models_on(db: Database, day: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Per requested model, that UTC day's totals (from the rollups), busiest first (None: all)."""
    rows = await db.fetchall(
        "SELECT model, sum(requests) AS requests, sum(errors) AS errors, sum(prompt_tokens) AS prompt_tokens, "
        "sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens, "
        "round(sum(cost_usd), 9) AS cost_usd, sum(cache_hits) AS cache_hits FROM usage_daily WHERE day = ? "
        "GROUP BY model ORDER BY requests DESC, model LIMIT ?", (day, -1 if limit is None else limit))
    return [dict(row) for row in rows]


async def backend_samples(db: Database, since: float) -> list[tuple[str, float | None, int]]:
    """(backend, latency ms, failed) of the requests routed to a backend since ``since``.

    Not cache hits (the backend never saw them) nor 429s: the gateway's own limits refuse before any
    backend is asked, and a backend's own 429 says it is up, as the circuit breaker sees it too.
    """
    rows = await db.fetchall(
        f"SELECT backend, latency_ms, {_FAILED} FROM requests WHERE created_at >= ? AND backend IS NOT NULL "
        "AND (cache IS NULL OR cache != 'HIT') AND status != 429", (since,))
    return [(row[0], row[1], int(row[2])) for row in rows]


async def traffic(db: Database, since: float, step_s: int) -> list[dict[str, Any]]:
    """Requests, errors and tokens per ``step_s`` since ``since`` (steps without traffic are absent)."""
    rows = await db.fetchall(
        f"SELECT CAST(created_at / ? AS INTEGER) AS step, count(*) AS requests, sum({_FAILED}) AS errors, "
        "sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)) AS tokens FROM requests "
        "WHERE created_at >= ? GROUP BY step ORDER BY step", (step_s, since))
    return [dict(row) for row in rows]


async def recent_errors(db: Database, since: float, limit: int) -> list[dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT created_at AS time, request_id, endpoint, model, backend, status, error_code FROM requests "
        f"WHERE created_at >= ? AND {_FAILED} ORDER BY created_at DESC LIMIT ?", (since, limit))
    return [dict(row) for row in rows]


def size_bytes(path: Path) -> int:
    """The database on disk: the file plus its write-ahead log."""
    total = 0
    for name in (str(path), f"{path}-wal"):
        try:
            total += os.stat(name).st_size
        except FileNotFoundError:
            pass
    return total
