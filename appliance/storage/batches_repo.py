"""SQL for batches, their request lines and the runner's lease.

Every write here is a durable one (BEGIN IMMEDIATE on the writer connection): a line's result and its
batch's counters change in the same transaction, so a crash at any point leaves them agreeing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiosqlite

from appliance.storage import files_repo
from appliance.storage.db import Database

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_ACTIVE_SQL = "('validating', 'in_progress', 'finalizing', 'cancelling')"
RUNNER = "batches"


async def create(db: Database, row: dict[str, Any]) -> None:
    columns = ", ".join(row)
    marks = ", ".join("?" for _ in row)

    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute(f"INSERT INTO batches ({columns}) VALUES ({marks})", tuple(row.values()))

    await db.write(work)


async def get(db: Database, batch_id: str) -> dict[str, Any] | None:
    rows = await db.fetchall("SELECT * FROM batches WHERE id = ?", (batch_id,))
    return dict(rows[0]) if rows else None


async def page(db: Database, *, owner: str | None, after: dict[str, Any] | None, limit: int,
               status: str | None = None) -> list[dict[str, Any]]:
    """Newest first; up to ``limit + 1`` rows (the extra one tells has_more)."""
    where, params = ["TRUE"], []
    if owner is not None:
        where.append("owner_key_id = ?")
        params.append(owner)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    if after is not None:
        where.append("(created_at, id) < (?, ?)")
        params += [after["created_at"], after["id"]]
    rows = await db.fetchall(f"SELECT * FROM batches WHERE {' AND '.join(where)} "
                             "ORDER BY created_at DESC, id DESC LIMIT ?", (*params, limit + 1))
    return [dict(row) for row in rows]


async def count_active(db: Database, owner: str) -> int:
    rows = await db.fetchall(f"SELECT count(*) FROM batches WHERE owner_key_id = ? AND status IN {_ACTIVE_SQL}",
                             (owner,))
    return int(rows[0][0])


async def request_cancel(db: Database, batch_id: str, now: int) -> dict[str, Any] | None:
    """Flip a validating or in-progress batch to cancelling; returns the batch as it now is."""
    async def work(conn: aiosqlite.Connection) -> dict[str, Any] | None:
        await conn.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? "
                           "WHERE id = ? AND status IN ('validating', 'in_progress')", (now, batch_id))
        rows = await conn.execute_fetchall("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return dict(rows[0]) if rows else None

    return await db.write(work)


async def active(db: Database) -> list[dict[str, Any]]:
    rows = await db.fetchall(f"SELECT * FROM batches WHERE status IN {_ACTIVE_SQL} ORDER BY created_at, id")
    return [dict(row) for row in rows]


# ------------------------------------------------------------------------------------------ the lease


async def take_lease(db: Database, owner: str, now: float, ttl_s: float) -> bool:
    """Take or renew the runner lease; True while ``owner`` holds it."""
    async def work(conn: aiosqlite.Connection) -> bool:
        cursor = await conn.execute(
            "INSERT INTO runner_lease (name, owner, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE runner_lease.owner = excluded.owner OR runner_lease.expires_at < ?",
            (RUNNER, owner, now + ttl_s, now))
        return cursor.rowcount > 0

    return await db.write(work)


async def release_lease(db: Database, owner: str) -> None:
    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute("DELETE FROM runner_lease WHERE name = ? AND owner = ?", (RUNNER, owner))

    await db.write(work)


def clear_lease_sync(conn: Any) -> None:
    """At start, under the data-dir lock: no runner of this data dir can still be alive (sqlite3 connection)."""
    conn.execute("DELETE FROM runner_lease WHERE name = ?", (RUNNER,))


# ------------------------------------------------------------------------------------------ validation


async def reset_requests(db: Database, batch_id: str) -> None:
    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))

    await db.write(work)


async def insert_requests(db: Database, batch_id: str, lines: Iterable[tuple[int, str, str]]) -> None:
    rows = [(batch_id, number, custom_id, body) for number, custom_id, body in lines]

    async def work(conn: aiosqlite.Connection) -> None:
        await conn.executemany("INSERT INTO batch_requests (batch_id, line, custom_id, body_json) "
                               "VALUES (?, ?, ?, ?)", rows)

    await db.write(work)


async def start(db: Database, batch_id: str, *, total: int, model: str | None, now: int) -> bool:
    """validating -> in_progress; False when the batch left validating meanwhile (cancelled)."""
    async def work(conn: aiosqlite.Connection) -> bool:
        cursor = await conn.execute(
            "UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ?, model = ? "
            "WHERE id = ? AND status = 'validating'", (now, total, model, batch_id))
        if cursor.rowcount == 0:  # cancelled while validating: it keeps its lines, total and model
            await conn.execute("UPDATE batches SET total = ?, model = ? WHERE id = ?", (total, model, batch_id))
        return cursor.rowcount > 0

    return await db.write(work)


async def fail(db: Database, batch_id: str, errors_json: str, now: int) -> None:
    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute("DELETE FROM batch_requests WHERE batch_id = ?", (batch_id,))
        await conn.execute("UPDATE batches SET status = 'failed', failed_at = ?, errors_json = ?, total = 0 "
                           "WHERE id = ? AND status IN ('validating', 'cancelling')", (now, errors_json, batch_id))

    await db.write(work)


# ------------------------------------------------------------------------------------------ lines


async def requeue_running(db: Database) -> int:
    """A new lease holder: the lines a previous runner had in flight go back to pending."""
    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute("UPDATE batch_requests SET state = 'pending', lease_until = NULL "
                                    "WHERE state = 'running'")
        return cursor.rowcount

    return await db.write(work)


async def claim(db: Database, batch_id: str, n: int, now: int, lease_until: int) -> list[dict[str, Any]]:
    """Up to ``n`` pending lines of the batch, oldest first, marked running (one more attempt each)."""
    async def work(conn: aiosqlite.Connection) -> list[dict[str, Any]]:
        rows = await conn.execute_fetchall(
            "UPDATE batch_requests SET state = 'running', attempts = attempts + 1, lease_until = ? "
            "WHERE batch_id = ? AND line IN (SELECT line FROM batch_requests WHERE batch_id = ? AND state = 'pending' "
            "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY line LIMIT ?) "
            "RETURNING line, custom_id, body_json, attempts", (lease_until, batch_id, batch_id, now, n))
        return sorted((dict(row) for row in rows), key=lambda row: row["line"])

    return await db.write(work)


async def retry_later(db: Database, batch_id: str, line: int, attempts: int, not_before: int) -> None:
    """Back to pending, not to be claimed before ``not_before`` (its attempt stays counted)."""
    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute("UPDATE batch_requests SET state = 'pending', lease_until = ? "
                           "WHERE batch_id = ? AND line = ? AND state = 'running' AND attempts = ?",
                           (not_before, batch_id, line, attempts))

    await db.write(work)


async def give_back(db: Database, batch_id: str, lines: Iterable[tuple[int, int]]) -> None:
    """Lines this runner stops working on without a result (shutdown, lost lease): pending, attempt not counted."""
    rows = [(batch_id, line, attempts) for line, attempts in lines]

    async def work(conn: aiosqlite.Connection) -> None:
        await conn.executemany("UPDATE batch_requests SET state = 'pending', lease_until = NULL, "
                               "attempts = attempts - 1 WHERE batch_id = ? AND line = ? AND state = 'running' "
                               "AND attempts = ?", rows)

    await db.write(work)


async def finish(db: Database, batch_id: str, line: int, attempts: int, *, ok: bool, status_code: int | None,
                 request_id: str | None, backend: str | None, response_json: str | None, error_json: str | None,
                 usage: tuple[int, int, int, int], now: int) -> bool:
    """Record a line's one result and count it in its batch, together; False if the claim was stale."""
    async def work(conn: aiosqlite.Connection) -> bool:
        cursor = await conn.execute(
            "UPDATE batch_requests SET state = ?, status_code = ?, request_id = ?, backend_id = ?, "
            "response_json = ?, error_json = ?, finished_at = ?, lease_until = NULL "
            "WHERE batch_id = ? AND line = ? AND state = 'running' AND attempts = ?",
            ("succeeded" if ok else "failed", status_code, request_id, backend, response_json, error_json, now,
             batch_id, line, attempts))
        if cursor.rowcount == 0:
            return False
        inputs, cached, outputs, reasoning = usage if ok else (0, 0, 0, 0)
        await conn.execute(
            "UPDATE batches SET completed = completed + ?, failed = failed + ?, input_tokens = input_tokens + ?, "
            "cached_tokens = cached_tokens + ?, output_tokens = output_tokens + ?, "
            "reasoning_tokens = reasoning_tokens + ? WHERE id = ?",
            (int(ok), int(not ok), inputs, cached, outputs, reasoning, batch_id))
        return True

    return await db.write(work)


async def close_unfinished(db: Database, batch_id: str, state: str, error_json: str, now: int) -> int:
    """Every line without a result becomes ``state`` (cancelled, expired) with ``error_json``; counted failed."""
    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute(
            "UPDATE batch_requests SET state = ?, error_json = ?, finished_at = ?, lease_until = NULL "
            "WHERE batch_id = ? AND state IN ('pending', 'running')", (state, error_json, now, batch_id))
        await conn.execute("UPDATE batches SET failed = failed + ? WHERE id = ?", (cursor.rowcount, batch_id))
        return cursor.rowcount

    return await db.write(work)


async def unfinished(db: Database, batch_id: str) -> int:
    rows = await db.fetchall("SELECT count(*) FROM batch_requests WHERE batch_id = ? AND state IN "
                             "('pending', 'running')", (batch_id,))
    return int(rows[0][0])


async def set_finalizing(db: Database, batch_id: str, now: int) -> None:
    async def work(conn: aiosqlite.Connection) -> None:
        await conn.execute("UPDATE batches SET status = 'finalizing', finalizing_at = ? "
                           "WHERE id = ? AND status = 'in_progress'", (now, batch_id))

    await db.write(work)


async def results(db: Database, batch_id: str, after_line: int, limit: int) -> list[dict[str, Any]]:
    rows = await db.fetchall(
        "SELECT line, custom_id, state, status_code, request_id, response_json, error_json FROM batch_requests "
        "WHERE batch_id = ? AND line > ? ORDER BY line LIMIT ?", (batch_id, after_line, limit))
    return [dict(row) for row in rows]


async def finalize(db: Database, batch_id: str, *, status: str, stamp: str, from_statuses: tuple[str, ...],
                   file_rows: list[dict[str, Any]], output_file_id: str | None, error_file_id: str | None,
                   now: int) -> bool:
    """Register the output files and set the terminal status, together; False if the batch moved on."""
    marks = ", ".join("?" for _ in from_statuses)

    async def work(conn: aiosqlite.Connection) -> bool:
        cursor = await conn.execute(
            f"UPDATE batches SET status = ?, {stamp} = ?, output_file_id = ?, error_file_id = ?, "
            "finalizing_at = coalesce(finalizing_at, ?) "
            f"WHERE id = ? AND status IN ({marks})",
            (status, now, output_file_id, error_file_id, now if status == "completed" else None, batch_id,
             *from_statuses))
        if cursor.rowcount == 0:
            return False
        for row in file_rows:
            await files_repo.insert_in(conn, row)
        return True

    return await db.write(work)


# ------------------------------------------------------------------------------------------ summaries


async def summary(db: Database) -> dict[str, Any]:
    """For /statsz and the status page: batches by status, and the unfinished ones with their progress."""
    counts = {row[0]: row[1] for row in await db.fetchall("SELECT status, count(*) FROM batches GROUP BY status")}
    rows = await db.fetchall(
        f"SELECT id, owner_key_id, endpoint, model, status, created_at, expires_at, total, completed, failed "
        f"FROM batches WHERE status IN {_ACTIVE_SQL} ORDER BY created_at, id")
    pending = await db.fetchall("SELECT count(*) FROM batch_requests WHERE state = 'pending'")
    return {"by_status": counts, "pending_lines": int(pending[0][0]),
            "active": [{**{k: row[k] for k in ("id", "owner_key_id", "endpoint", "model", "status", "created_at",
                                               "expires_at")},
                        "request_counts": {"total": row["total"], "completed": row["completed"],
                                           "failed": row["failed"]}} for row in rows]}


async def purge_lines(db: Database, before: int) -> int:
    """Drop the request lines of batches that ended before ``before`` (their output files hold the results)."""
    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute(
            "DELETE FROM batch_requests WHERE batch_id IN (SELECT id FROM batches WHERE status IN "
            "('completed', 'expired', 'cancelled', 'failed') AND coalesce(completed_at, expired_at, cancelled_at, "
            "failed_at) < ?)", (before,))
        return cursor.rowcount

    return await db.write(work)
