"""Forward-only schema migrations, applied once by the main process before any worker starts."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

DB_FILENAME = "appliance.db"
_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")


class SchemaError(Exception):
    """The database cannot be used by this version of the code."""


def database_path(data_dir: Path) -> Path:
    return data_dir / DB_FILENAME


def known_migrations(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.sql") if _NAME.match(p.name))
    if not files:
        raise SchemaError(f"no migrations found in {folder}")
    return files


def migrate(db_path: Path, folder: Path) -> list[str]:
    """Apply pending migrations in order; returns the names applied.

    Refuses a database that has migrations this code does not know (it is newer than the code).
    """
    db_path.parent.mkdir(parents=True, exist_ok=True)
    files = known_migrations(folder)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        applied = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
        known = {p.name for p in files}
        unknown = sorted(applied - known)
        if unknown:
            raise SchemaError(
                f"{db_path} has schema migration {unknown[-1]} that this appliance does not know: "
                "the database was written by a newer version. Upgrade the appliance or use another data dir."
            )
        done = []
        for path in files:
            if path.name in applied:
                continue
            script = path.read_text(encoding="utf-8")
            # executescript commits first, so wrap the file in its own transaction.
            conn.executescript(
                "BEGIN IMMEDIATE;\n" + script + "\n;INSERT INTO _migrations (name, applied_at) "
                f"VALUES ('{path.name}', datetime('now'));\nCOMMIT;"
            )
            done.append(path.name)
        return done
    except sqlite3.DatabaseError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise SchemaError(f"{db_path}: {exc}") from exc
    finally:
        conn.close()


def applied_migrations(db_path: Path) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    finally:
        conn.close()
