"""SQL for the request log."""

from __future__ import annotations

from typing import Any, NamedTuple

from appliance.storage.db import Database


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
    session_id: str | None = None
    batch_id: str | None = None
    # The newest fields, last and with defaults: journal lines written before them still parse.
    compute_cost_usd: float | None = None
    template: str | None = None  # "id@version" of the prompt template the request used
    guardrails: str | None = None  # JSON: each guardrail applied and its outcome, e.g. {"pii": "redacted"}
    failover: str | None = None  # JSON: where a stream failed mid-way and went on, {"from", "to", "at_token"}


INSERT = (
    "INSERT INTO requests (request_id, created_at, endpoint, model, backend, backend_model, status, "
    "error_code, stream, latency_ms, overhead_ms, ttft_ms, prompt_tokens, completion_tokens, estimated, "
    "key_id, cached_tokens, input_cost_usd, output_cost_usd, cost_usd, cache, session_id, batch_id, "
    "compute_cost_usd, template, guardrails, failover) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)



async def recent(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    rows = await db.fetchall("SELECT * FROM requests ORDER BY id DESC LIMIT ?", (limit,))
    return [dict(row) for row in rows]


async def count(db: Database) -> int:
    rows = await db.fetchall("SELECT count(*) FROM requests")
    return int(rows[0][0])


async def for_session(db: Database, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """A session's requests, oldest first."""
    rows = await db.fetchall("SELECT * FROM requests WHERE session_id = ? ORDER BY id LIMIT ?", (session_id, limit))
    return [dict(row) for row in rows]


async def recent_for_key(db: Database, key_id: str, limit: int = 20) -> list[dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT request_id, created_at, endpoint, model, status, prompt_tokens, completion_tokens, cost_usd, "
        "latency_ms FROM requests WHERE key_id = ? ORDER BY id DESC LIMIT ?", (key_id, limit))
    return [dict(row) for row in rows]


INSERT_BODIES = ("INSERT INTO request_bodies (request_id, created_at, request, response, truncated) "
                 "VALUES (?, ?, ?, ?, ?)")



_COLUMNS = ("id, request_id, created_at, endpoint, model, backend, backend_model, status, error_code, stream, "
            "latency_ms, overhead_ms, ttft_ms, prompt_tokens, completion_tokens, cached_tokens, estimated, key_id, "
            "input_cost_usd, output_cost_usd, cost_usd, compute_cost_usd, cache, template, guardrails, failover")


async def search(db: Database, *, limit: int, model: str | None = None, status: int | None = None,
                 status_class: int | None = None, key_id: str | None = None, before_id: int | None = None,
                 with_bodies: bool = False) -> list[dict[str, Any]]:
    """The newest rows first, filtered; ``status_class`` 5 means 500-599. Bodies joined when asked."""
    where, params = [], []
    for clause, value in (("model = ?", model), ("status = ?", status), ("key_id = ?", key_id),
                          ("id < ?", before_id)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if status_class is not None:
        where.append("status BETWEEN ? AND ?")
        params += [status_class * 100, status_class * 100 + 99]
    sql = (f"SELECT {_COLUMNS} FROM requests" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY id DESC LIMIT ?")
    rows = [dict(row) for row in await db.fetchall(sql, [*params, limit])]
    if with_bodies and rows:
        await _attach_bodies(db, rows)
    return rows


async def _attach_bodies(db: Database, rows: list[dict[str, Any]]) -> None:
    found = await db.fetchall(
        "SELECT request_id, created_at, request, response, truncated FROM request_bodies WHERE request_id IN "
        f"({', '.join('?' * len(rows))})", [row["request_id"] for row in rows])
    bodies = {(b["request_id"], b["created_at"]): b for b in found}
    for row in rows:
        body = bodies.get((row["request_id"], row["created_at"]))
        row["request_body"] = body["request"] if body else None
        row["response_body"] = body["response"] if body else None
        row["body_truncated"] = bool(body["truncated"]) if body else False


SWEEP_BATCH = 5000


async def sweep(db: Database, older_than: float) -> int:
    """Delete request-log rows and bodies created before ``older_than`` (unix seconds), in small batches
    so the writer is never held for long. Idempotent: workers may sweep at the same time."""
    removed = 0
    for table in ("requests", "request_bodies"):
        while True:
            count = await db.write(lambda conn, table=table: _delete_batch(conn, table, older_than))
            removed += count
            if count < SWEEP_BATCH:
                break
    return removed


async def _delete_batch(conn: Any, table: str, older_than: float) -> int:
    cursor = await conn.execute(
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE created_at < ? LIMIT ?)",
        (older_than, SWEEP_BATCH))
    return cursor.rowcount
