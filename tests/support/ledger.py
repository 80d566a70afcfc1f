"""Rows of an appliance's request log, read straight from its SQLite file (the writer flushes every 250 ms)."""

from __future__ import annotations

import sqlite3
import time

from tests.support.appliance import Appliance


def logged(app: Appliance, request_id: str, timeout: float = 10) -> sqlite3.Row:
    """The request log row of ``request_id``, once a worker's writer has flushed it."""
    return rows_where(app, "request_id = ?", (request_id,), count=1, timeout=timeout)[0]


def rows_where(app: Appliance, where: str, args: tuple[object, ...], *, count: int,
               timeout: float = 10) -> list[sqlite3.Row]:
    """The request log rows matching ``where``, oldest first, once there are at least ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(app.data_dir / "appliance.db")
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(f"SELECT * FROM requests WHERE {where} ORDER BY id", args).fetchall()
        finally:
            conn.close()
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} request log rows where {where} {args}: {len(rows)}")
        time.sleep(0.05)
