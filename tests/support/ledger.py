"""Rows of an appliance's request log, read straight from its database (the writer flushes every 250 ms):
its SQLite file, or the PostgreSQL database of its ``[database] url``."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from tests.support.appliance import Appliance


def logged(app: Appliance, request_id: str, timeout: float = 10) -> sqlite3.Row:
    """The request log row of ``request_id``, once a worker's writer has flushed it."""
    return rows_where(app, "request_id = ?", (request_id,), count=1, timeout=timeout)[0]


def rows_where(app: Appliance, where: str, args: tuple[object, ...], *, count: int,
               timeout: float = 10) -> list[sqlite3.Row]:
    """The request log rows matching ``where``, oldest first, once there are at least ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        rows = query(app, f"SELECT * FROM requests WHERE {where} ORDER BY id", args)
        if len(rows) >= count:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} request log rows where {where} {args}: {len(rows)}")
        time.sleep(0.05)


def query(app: Appliance, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
    """``sql`` (SQLite's, with ? placeholders) on the appliance's database; rows read by name or index."""
    url = app.config.get("database", {}).get("url")
    if url is None:
        conn = sqlite3.connect(app.data_dir / "appliance.db")
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
    from appliance.storage import pg

    pg_conn = pg.connect_sync(url)
    try:
        return pg_conn.execute(sql, args)
    finally:
        pg_conn.close()
