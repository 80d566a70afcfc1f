"""Rows of an appliance's request log, read straight from its SQLite file (the writer flushes every 250 ms)."""

from __future__ import annotations

import sqlite3
import time

from tests.support.appliance import Appliance


def logged(app: Appliance, request_id: str, timeout: float = 10) -> sqlite3.Row:
    """The request log row of ``request_id``, once a worker's writer has flushed it."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(app.data_dir / "appliance.db")
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        finally:
            conn.close()
        if row is not None:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"no request log row for {request_id}")
        time.sleep(0.05)
