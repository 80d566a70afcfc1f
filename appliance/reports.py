"""Usage as people read it: the admin usage report and what a key sees of itself (GET /v1/key).

Totals come from the daily rollups (written through the buffered writer, so at most one flush interval
behind); what a key may still spend comes from the live counters, which are exact.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from appliance.auth import Principal, public_view
from appliance.errors import GatewayError
from appliance.limits import Limiter, key_scope
from appliance.storage import keys_repo, requests_repo, usage_repo
from appliance.storage.db import Database

GROUPS = ("day", "model", "key")
RECENT = 20


def _day(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise GatewayError("invalid_value", f"'{param}' must be a day like 2026-01-31.", param=param) from None


async def report(db: Database, *, key_id: str | None = None, model: str | None = None, start: str | None = None,
                 end: str | None = None, group_by: str = "day") -> list[dict[str, Any]]:
    """Requests, errors, tokens and cost per day, model or key; ``start``/``end`` are inclusive UTC days."""
    return await usage_repo.report(db, key_id=key_id, model=model, day_from=_day(start, "from"),
                                   day_to=_day(end, "to"), group_by=group_by)


async def key_view(db: Database, limiter: Limiter, principal: Principal) -> dict[str, Any]:
    """A key's own role, limits, budget left and recent usage."""
    row = await keys_repo.get(db, principal.key_id)
    view: dict[str, Any] = public_view(row) if row else {"id": principal.key_id, "object": "api_key",
                                                         "name": principal.name, "role": principal.role}
    scope = key_scope(principal)
    view["limits"] = {"rpm": principal.rpm, "tpm": principal.tpm, "max_concurrent": principal.max_concurrent,
                      "window_s": limiter.window_s}
    view["state"] = limiter.budget_state(scope) if scope is not None else None
    today = usage_repo.day_of(time.time())
    view["usage"] = {
        "today": (await usage_repo.report(db, key_id=principal.key_id, day_from=today, day_to=today) or [None])[0],
        "recent": await requests_repo.recent_for_key(db, principal.key_id, RECENT),
    }
    return view
