"""SQL for prompt templates: a template row (its id, latest version, times) and its immutable versions."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import aiosqlite
import orjson

from appliance.storage.db import Database


class Exists(Exception):
    """A template with this id exists already."""


class Missing(Exception):
    """No template with this id."""


def _version(row: Any) -> dict[str, Any]:
    data = dict(row)
    data["messages"] = orjson.loads(data["messages"])
    data["variables"] = orjson.loads(data["variables"])
    return data


_VERSION = ("SELECT v.template_id AS id, v.version, v.messages, v.variables, v.description, v.created_at, "
            "t.latest_version FROM template_versions AS v JOIN templates AS t ON t.id = v.template_id")


async def get_version(db: Database, template_id: str, version: int | None = None) -> dict[str, Any] | None:
    """One version (the latest when ``version`` is None) with the template's ``latest_version``; None: no such."""
    if version is None:
        rows = await db.fetchall(f"{_VERSION} WHERE v.template_id = ? AND v.version = t.latest_version",
                                 (template_id,))
    else:
        rows = await db.fetchall(f"{_VERSION} WHERE v.template_id = ? AND v.version = ?", (template_id, version))
    return _version(rows[0]) if rows else None


async def exists(db: Database, template_id: str) -> bool:
    return bool(await db.fetchall("SELECT 1 FROM templates WHERE id = ?", (template_id,)))


async def versions(db: Database, template_id: str) -> list[dict[str, Any]]:
    """Every version of a template, oldest first (empty: no such template)."""
    rows = await db.fetchall(f"{_VERSION} WHERE v.template_id = ? ORDER BY v.version", (template_id,))
    return [_version(row) for row in rows]


async def list_all(db: Database) -> list[dict[str, Any]]:
    """Every template: id, latest version and its description, created and updated times; by id."""
    rows = await db.fetchall(
        "SELECT t.id, t.latest_version, v.description, t.created_at, t.updated_at FROM templates AS t "
        "JOIN template_versions AS v ON v.template_id = t.id AND v.version = t.latest_version ORDER BY t.id")
    return [dict(row) for row in rows]


async def _insert_version(conn: aiosqlite.Connection, template_id: str, version: int, fields: dict[str, Any],
                          now: float) -> None:
    await conn.execute(
        "INSERT INTO template_versions (template_id, version, messages, variables, description, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (template_id, version, orjson.dumps(fields["messages"]).decode(), orjson.dumps(fields["variables"]).decode(),
         fields.get("description"), now))


async def create(db: Database, template_id: str, fields: dict[str, Any]) -> None:
    """A new template whose version 1 holds ``fields`` (messages, variables, description); Exists if taken."""
    now = time.time()

    async def work(conn: aiosqlite.Connection) -> None:
        try:
            await conn.execute("INSERT INTO templates (id, latest_version, created_at, updated_at) VALUES (?, 1, ?, ?)",
                               (template_id, now, now))
        except sqlite3.IntegrityError:
            raise Exists(template_id) from None
        await _insert_version(conn, template_id, 1, fields, now)

    await db.write(work)


async def add_version(db: Database, template_id: str, fields: dict[str, Any]) -> int:
    """Add the next version (one transaction: two writers cannot take the same number); Missing if no template.

    The number is taken by the UPDATE itself: it holds the template's row until the commit, so two nodes on one
    PostgreSQL (whose transactions do not exclude each other as SQLite's BEGIN IMMEDIATE does) take two numbers.
    """
    now = time.time()

    async def work(conn: aiosqlite.Connection) -> int:
        rows = list(await conn.execute_fetchall(
            "UPDATE templates SET latest_version = latest_version + 1, updated_at = ? WHERE id = ? "
            "RETURNING latest_version", (now, template_id)))
        if not rows:
            raise Missing(template_id)
        version = int(rows[0][0])
        await _insert_version(conn, template_id, version, fields, now)
        return version

    return await db.write(work)


async def delete(db: Database, template_id: str) -> int:
    """Delete a template and all its versions; the number of versions deleted (0: there was no such template)."""

    async def work(conn: aiosqlite.Connection) -> int:
        cursor = await conn.execute("DELETE FROM template_versions WHERE template_id = ?", (template_id,))
        removed = cursor.rowcount
        await conn.execute("DELETE FROM templates WHERE id = ?", (template_id,))
        return removed

    return await db.write(work)
