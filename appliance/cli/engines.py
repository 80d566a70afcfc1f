"""check-config's second half: connect to the engines a config names and say what was found."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable

from appliance.common.config import Settings, masked_url


def check(settings: Settings) -> bool:
    """One line per configured engine on stderr; False when one cannot be used."""
    return asyncio.run(_check(settings))


async def _check(settings: Settings) -> bool:
    ok = True
    if settings.state.url:
        ok &= await _report("state", settings.state.url, _redis(settings))
    if settings.database.url:
        ok &= await _report("database", settings.database.url, asyncio.to_thread(_postgres, settings.database.url))
    return ok


async def _report(section: str, url: str, probe: Awaitable[str]) -> bool:
    try:
        found = await probe
    except Exception as exc:  # any failure to connect is the answer here
        print(f"{section}: {masked_url(url)}: unreachable ({exc})", file=sys.stderr)
        return False
    print(f"{section}: {masked_url(url)}: {found}", file=sys.stderr)
    return True


async def _redis(settings: Settings) -> str:
    from appliance.storage.state import SharedState

    state = SharedState.connect(settings.state)
    try:
        return await state.describe()
    finally:
        await state.close()


def _postgres(url: str) -> str:
    """The server's version and where the schema is: e.g. "PostgreSQL 15.18, schema at 0016_..., 0 pending"."""
    from appliance.common.resources import migrations_dir
    from appliance.storage import pg
    from appliance.storage.migrate import known_migrations

    applied = pg.applied_migrations(url)
    conn = pg.connect_sync(url)
    try:
        version = conn.server_version
    finally:
        conn.close()
    pending = len({p.name for p in known_migrations(migrations_dir())} - set(applied))
    schema = f"schema at {applied[-1]}" if applied else "empty (no schema yet)"
    return f"PostgreSQL {version}, {schema}, {pending} migration{'s' if pending != 1 else ''} pending"
