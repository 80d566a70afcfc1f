"""Which engine holds the durable records: SQLite in the data dir, or PostgreSQL when ``[database] url`` is set.

The one place that chooses; asyncpg is imported only on the PostgreSQL side (a single appliance does not pay
its import time).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from appliance.common.config import DatabaseSettings
from appliance.storage.db import Database
from appliance.storage.migrate import DB_FILENAME, database_path, migrate


async def open_database(data_dir: Path, settings: DatabaseSettings) -> Database:
    """A worker's (or the CLI's) database: SQLite in ``data_dir``, or a pool on PostgreSQL."""
    if settings.url is None:
        return await Database.open(data_dir / DB_FILENAME)
    from appliance.storage.pg import PgDatabase

    return await PgDatabase.connect(settings.url, settings.pool_size)


def migrate_database(data_dir: Path, url: str | None, folder: Path) -> list[str]:
    """Apply pending migrations to the configured engine; returns the names applied."""
    if url is None:
        return migrate(database_path(data_dir), folder)
    from appliance.storage import pg

    return pg.migrate(url, folder)


def connect_sync(data_dir: Path, url: str | None) -> Any:
    """A plain connection for the main process's start-up chores (``execute(sql, params)`` returns rows;
    ``close()``): sqlite3's, or pg.SyncConnection. Never kept across the fork of the workers."""
    if url is None:
        return sqlite3.connect(data_dir / DB_FILENAME, isolation_level=None)
    from appliance.storage import pg

    return pg.connect_sync(url)
