"""SQL for usage rollups and the reports built on them and on the request log."""

from __future__ import annotations

import functools
import time
from typing import Any

from appliance.storage.db import Database

ROLLUP = (
    "INSERT INTO usage_daily (day, key_id, model, backend, backend_model, requests, errors, prompt_tokens, "
    "completion_tokens, cached_tokens, cost_usd, cache_hits, compute_cost_usd) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, key_id, model, backend, backend_model) DO UPDATE SET "  # table-qualified for PostgreSQL
    "requests = usage_daily.requests + excluded.requests, errors = usage_daily.errors + excluded.errors, "
    "prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, "
    "cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens, "
    "cost_usd = usage_daily.cost_usd + excluded.cost_usd, cache_hits = usage_daily.cache_hits + excluded.cache_hits, "
    "compute_cost_usd = usage_daily.compute_cost_usd + excluded.compute_cost_usd"
)


def day_of(timestamp: float) -> str:
    """The UTC day a rollup row belongs to."""
    return _day(int(timestamp // 86400))


@functools.lru_cache(maxsize=64)
def _day(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(days * 86400))



_GROUPS = {"day": "day", "model": "model", "key": "key_id"}


async def report(db: Database, *, key_id: str | None = None, model: str | None = None,
                 day_from: str | None = None, day_to: str | None = None, group_by: str = "day") -> list[dict[str, Any]]:
    """Totals from the daily rollups, grouped by day, model or key; days are inclusive YYYY-MM-DD."""
    column = _GROUPS[group_by]
    where, params = [], []
    for clause, value in (("key_id = ?", key_id), ("model = ?", model), ("day >= ?", day_from),
                          ("day <= ?", day_to)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = (f"SELECT {column} AS {group_by}, sum(requests) AS requests, sum(errors) AS errors, "
           "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
           "sum(cached_tokens) AS cached_tokens, round(sum(cost_usd), 9) AS cost_usd, "
           "round(sum(compute_cost_usd), 9) AS compute_cost_usd FROM usage_daily"
           + (" WHERE " + " AND ".join(where) if where else "") + f" GROUP BY {column} ORDER BY {column}")
    return [dict(row) for row in await db.fetchall(sql, params)]


# What a key's budget counts (its budget_counts): token prices, compute, or both.
_SPENT = {"price": "sum(cost_usd)", "compute": "sum(compute_cost_usd)", "both": "sum(cost_usd + compute_cost_usd)"}


async def spent(db: Database, key_id: str, day_from: str, counts: str = "price") -> tuple[float, int]:
    """(USD, tokens) a key used from ``day_from`` (YYYY-MM-DD, inclusive) on; the USD as ``counts`` reckons it."""
    rows = await db.fetchall(
        f"SELECT {_SPENT[counts]}, sum(prompt_tokens + completion_tokens) FROM usage_daily "
        "WHERE key_id = ? AND day >= ?", (key_id, day_from))
    return float(rows[0][0] or 0), int(rows[0][1] or 0)
