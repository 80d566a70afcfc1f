"""Usage as people read it: the admin usage report and what a key sees of itself (GET /v1/key).

Totals come from the daily rollups (written through the buffered writer, so at most one flush interval
behind); what a key may still spend comes from the live counters, which are exact.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import time
from typing import Any

import orjson

from appliance.accounts.auth import Principal, public_view
from appliance.accounts.limits import Limiter, Scope, key_scope, period_start_day
from appliance.accounts.live_limits import RedisLimiter
from appliance.common.errors import GatewayError
from appliance.storage import keys_repo, requests_repo, usage_repo
from appliance.storage.db import Database
from appliance.storage.state import StateUnavailable

log = logging.getLogger("appliance.reports")

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


async def key_view(db: Database, limiter: Limiter | RedisLimiter, principal: Principal) -> dict[str, Any]:
    """A key's own role, limits, budget left and recent usage."""
    row = await keys_repo.get(db, principal.key_id)
    view: dict[str, Any] = public_view(row) if row else {"id": principal.key_id, "object": "api_key",
                                                         "name": principal.name, "role": principal.role}
    scope = key_scope(principal)
    view["limits"] = {"rpm": principal.rpm, "tpm": principal.tpm, "max_concurrent": principal.max_concurrent,
                      "window_s": limiter.window_s}
    view["state"] = await _budget_state(limiter, scope) if scope is not None else None
    today = usage_repo.day_of(time.time())
    view["usage"] = {
        "today": (await usage_repo.report(db, key_id=principal.key_id, day_from=today, day_to=today) or [None])[0],
        "recent": await requests_repo.recent_for_key(db, principal.key_id, RECENT),
    }
    return view


async def _budget_state(limiter: Limiter | RedisLimiter, scope: Scope) -> dict[str, Any]:
    if isinstance(limiter, Limiter):
        return limiter.budget_state(scope)
    try:
        return await limiter.budget_state(scope)
    except StateUnavailable:
        raise limiter.state.refusal("This key's live limits and spend are in") from None


async def recount_budget(db: Database, limiter: Limiter | RedisLimiter, row: dict[str, Any]) -> None:
    """A key's budget now counts something else (budget_counts changed): what its period already spent, counted
    the new way, from the ledger (at most one flush interval behind), as at start."""
    scope = key_scope(Principal.from_row(row))
    if scope is None or not scope.budget_period:
        return
    usd, tokens = await usage_repo.spent(db, scope.owner, period_start_day(scope.budget_period, time.time()),
                                         scope.budget_counts)
    if isinstance(limiter, Limiter):
        limiter.preload(scope, spent_usd=usd, spent_tokens=tokens)
    else:
        try:
            await limiter.preload(scope, spent_usd=usd, spent_tokens=tokens, replace=True)
        except StateUnavailable:
            log.warning("key %s: its budget's spend not recounted in the shared state (unreachable)", scope.owner)


REQUESTS_LIMIT = 100
REQUESTS_LIMIT_MAX = 1000


def _int_param(value: str | None, param: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise GatewayError("invalid_value", f"'{param}' must be an integer from {low} to {high}.", param=param)
    return number


def _status_param(value: str | None) -> tuple[int | None, int | None]:
    """An exact status (429) or a class (4xx): (status, class digit)."""
    if value is None:
        return None, None
    text = value.strip().lower()
    if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
        return None, int(text[0])
    if len(text) == 3 and text.isdigit() and 100 <= int(text) <= 599:
        return int(text), None
    raise GatewayError("invalid_value", "'status' must be an HTTP status like 429 or a class like 5xx.",
                       param="status")


async def request_log(db: Database, args: dict[str, str | None]) -> list[dict[str, Any]]:
    """GET /admin/requests: the newest request-log rows first, filtered; bodies where they were stored."""
    unknown = sorted(set(args) - {"limit", "model", "status", "key", "before"})
    if unknown:
        raise GatewayError("invalid_value", f"Unknown parameter '{unknown[0]}' (known: limit, model, status, key, "
                           "before).", param=unknown[0])
    limit = _int_param(args.get("limit"), "limit", 1, REQUESTS_LIMIT_MAX) or REQUESTS_LIMIT
    before = _int_param(args.get("before"), "before", 1, 2**63 - 1)
    status, status_class = _status_param(args.get("status"))
    rows = await requests_repo.search(db, limit=limit, model=args.get("model"), status=status,
                                      status_class=status_class, key_id=args.get("key"), before_id=before,
                                      with_bodies=True)
    for row in rows:
        row["stream"] = bool(row["stream"])
        row["estimated"] = bool(row["estimated"])
        row["guardrails"] = orjson.loads(row["guardrails"]) if row.get("guardrails") else None
        row["failover"] = orjson.loads(row["failover"]) if row.get("failover") else None
        for name in ("request_body", "response_body"):
            row[name] = _body(row.get(name))
    return rows


def _body(raw: bytes | None) -> Any:
    """A stored body as JSON when it parses, else as text (a body cut to max_body_kb no longer parses)."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return bytes(raw).decode("utf-8", "replace")


async def budget_spend(db: Database, now: float) -> list[tuple[Scope, float, float]]:
    """Every key with a budget, and what its current period has spent so far (USD, tokens) by the ledger."""
    spent = []
    for row in await keys_repo.list_all(db):
        scope = key_scope(Principal.from_row(row))
        if scope is not None and scope.budget_period:
            spent.append((scope, *await usage_repo.spent(db, scope.owner, period_start_day(scope.budget_period, now),
                                                         scope.budget_counts)))
    return spent


async def reseed_budgets(db: Database, limiter: RedisLimiter) -> None:
    """The shared state came back, maybe empty (a Redis restarted without its data): budgets get the ledger's
    spend again where Redis has none of the period (where it kept its counters, nothing changes)."""
    try:
        for scope, usd, tokens in await budget_spend(db, time.time()):
            await limiter.preload(scope, spent_usd=usd, spent_tokens=tokens)
    except (StateUnavailable, sqlite3.Error) as exc:
        log.warning("budgets not seeded from the ledger in the shared state (%s); the next connection tries again",
                    exc)
