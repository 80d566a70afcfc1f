"""SQL for the request log."""

from __future__ import annotations

from typing import Any, NamedTuple

from appliance.storage.db import BufferedWriter, Database


class RequestRecord(NamedTuple):
    request_id: str
    created_at: float
    endpoint: str
    model: str | None
    backend: str | None
    backend_model: str | None
    status: int
    error_code: str | None
    stream: bool
    latency_ms: float
    overhead_ms: float | None
    ttft_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    estimated: bool
    key_id: str | None
    cached_tokens: int | None
    input_cost_usd: float | None
    output_cost_usd: float | None
    cost_usd: float | None
    cache: str | None
    batch_id: str | None = None


_INSERT = (
    "INSERT INTO requests (request_id, created_at, endpoint, model, backend, backend_model, status, "
    "error_code, stream, latency_ms, overhead_ms, ttft_ms, prompt_tokens, completion_tokens, estimated, "
    "key_id, cached_tokens, input_cost_usd, output_cost_usd, cost_usd, cache, batch_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def record(writer: BufferedWriter, row: RequestRecord) -> None:
    """Queue one row; written at the next flush."""
    writer.add(_INSERT, row)


async def recent(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    rows = await db.fetchall("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,))
    return [dict(row) for row in rows]


async def count(db: Database) -> int:
    rows = await db.fetchall("SELECT count(*) FROM requests")
    return int(rows[0][0])


async def recent_for_key(db: Database, key_id: str, limit: int = 20) -> list[dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT request_id, created_at, endpoint, model, status, prompt_tokens, completion_tokens, cost_usd, "
        "latency_ms FROM requests WHERE key_id = ? ORDER BY id DESC LIMIT ?", (key_id, limit))
    return [dict(row) for row in rows]
