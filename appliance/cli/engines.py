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
