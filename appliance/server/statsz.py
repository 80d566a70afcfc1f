"""/statsz: the appliance at a glance, as the status page reads it (static/app.js).

The document is built by sections, one small function each, merged in order (``SECTIONS``); a new
section is one function plus one entry there. Every number is the same whichever worker answers: what
is durable comes from SQLite (today's rollups, short windows of the request log, both at most one
flush interval behind), what is live from memory every worker shares (the backend table: probes,
breakers, in flight; the metrics files: workers, limit rejections, the write queue). Each worker keeps
the result for ``ttl_s`` so many pollers cost one computation a second.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance import __version__
from appliance.core import provider_catalog, timings
from appliance.core.gateway import Gateway
from appliance.observe import metrics
from appliance.storage import batches_repo, stats_repo, usage_repo

TRAFFIC_STEP_S = 60  # the traffic rollup's step (stats_repo.traffic_minute)
TRAFFIC_STEPS = 60  # the sparkline: an hour, per minute
RATE_STEPS = 5  # requests/s over the last five minutes
MODELS_SHOWN = 50
RECENT_ERRORS = 20


# Series read from the workers' shared metrics files, once per build.
LIVE_SERIES = ("appliance_workers", "appliance_inflight_requests", "appliance_ratelimit_rejections_total",
               "appliance_db_write_queue_depth")


@dataclass(frozen=True, slots=True)
class StatsContext:
    gateway: Gateway
    now: float  # unix seconds
    started_at: float  # when the appliance (its main process) started
    live: dict[str, dict[Any, float]]  # metrics.shared_values(LIVE_SERIES)


Section = Callable[[StatsContext], Awaitable[dict[str, Any]]]


async def about(ctx: StatsContext) -> dict[str, Any]:
    server = ctx.gateway.settings.server
    live = ctx.live
    return {"version": __version__, "now": ctx.now, "uptime_s": round(ctx.now - ctx.started_at, 3),
            "workers": {"configured": 1 if server.single_process else server.workers,
                        "alive": int(_total(live, "appliance_workers"))},
            "degraded": ctx.gateway.degraded(),
            "inflight": int(_total(live, "appliance_inflight_requests"))}


async def usage_today(ctx: StatsContext) -> dict[str, Any]:
    """Per model and in total, today (UTC), from the daily rollups (requests made with a key)."""
    day = usage_repo.day_of(ctx.now)
    rows = await stats_repo.models_on(ctx.gateway.db, day, limit=None)
    totals = {name: sum(row[name] or 0 for row in rows) for name in
              ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
               "compute_cost_usd", "cache_hits")}
    totals["cost_usd"] = round(totals["cost_usd"], 9)
    totals["compute_cost_usd"] = round(totals["compute_cost_usd"], 9)
    totals["cache_hit_rate"] = _rate(totals["cache_hits"], totals["requests"])
    models = [{**row, "cache_hit_rate": _rate(row["cache_hits"], row["requests"])} for row in rows[:MODELS_SHOWN]]
    return {"day": day, "totals": totals, "models": models}


async def backends(ctx: StatsContext) -> dict[str, Any]:
    """Each backend: health (the latest probe by any worker), breaker, in flight, its capacity and the requests
    waiting for it in the fair admission queue (per key id), the last 5 minutes."""
    gw = ctx.gateway
    first_minute = int(ctx.now // TRAFFIC_STEP_S) - RATE_STEPS + 1
    counts = await stats_repo.backend_counts(gw.db, first_minute)
    recent = await timings.recent(gw.db, ctx.now)
    out = []
    for name, local in gw.catalog.backends.items():
        shared = gw.breakers.state(name)
        requests, failed = counts.get(name, (0, 0))
        out.append({
            "name": name, "kind": local.kind, **provider_catalog.health(shared),
            "last_probe_at": shared["probed_at"], "last_error": local.last_error if shared["up"] is False else None,
            "models": len(local.models), "inflight": shared["in_flight"],
            "capacity": gw.admission.capacity(name), "queued": shared["queued"],
            "waiting_keys": gw.admission.waiting(name) if shared["queued"] else {},
            "latency_ms": recent.of(name).latency_ms, "requests": requests, "error_rate": _rate(failed, requests),
        })
    return {"backends": out, "backend_window_s": timings.WINDOW_S}


async def traffic(ctx: StatsContext) -> dict[str, Any]:
    """Requests, errors and tokens per minute over the last hour (every request, with a key or not)."""
    last = int(ctx.now // TRAFFIC_STEP_S)
    first = last - TRAFFIC_STEPS + 1
    rows = {row["minute"]: row for row in await stats_repo.traffic(ctx.gateway.db, first)}
    points = []
    for minute in range(first, last + 1):
        row = rows.get(minute, {})
        points.append({"t": minute * TRAFFIC_STEP_S, "requests": row.get("requests", 0),
                       "errors": row.get("errors", 0), "tokens": row.get("tokens", 0)})
    recent = sum(p["requests"] for p in points[-RATE_STEPS:])
    elapsed = (RATE_STEPS - 1) * TRAFFIC_STEP_S + (ctx.now - last * TRAFFIC_STEP_S)  # the newest step is partial
    return {"traffic": points, "requests_per_s": round(recent / elapsed, 3)}


async def recent_errors(ctx: StatsContext) -> dict[str, Any]:
    since = ctx.now - TRAFFIC_STEPS * TRAFFIC_STEP_S
    return {"recent_errors": await stats_repo.recent_errors(ctx.gateway.db, since, RECENT_ERRORS)}


async def limits_and_db(ctx: StatsContext) -> dict[str, Any]:
    """Limit rejections since start and the write queue: the live counters every worker adds to."""
    live = ctx.live
    by_limit = {dict(labels).get("limit", ""): int(value)
                for labels, value in live.get("appliance_ratelimit_rejections_total", {}).items()}
    return {"limits": {"rejections": sum(by_limit.values()), "by_limit": by_limit},
            "db": {"size_bytes": await stats_repo.size_bytes(ctx.gateway.db),
                   "write_queue_depth": int(_total(live, "appliance_db_write_queue_depth"))}}


async def batches(ctx: StatsContext) -> dict[str, Any]:
    """Batches by status, lines still to run, and the unfinished batches with their progress."""
    return {"batches": await batches_repo.summary(ctx.gateway.db)}


SECTIONS: tuple[Section, ...] = (about, usage_today, backends, traffic, recent_errors, limits_and_db, batches)


async def build(ctx: StatsContext, sections: tuple[Section, ...] = SECTIONS) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for section in sections:
        doc.update(await section(ctx))
    doc["totals"]["requests_per_s"] = doc.pop("requests_per_s", None)
    return doc


class StatszCache:
    """One worker's latest document, rebuilt at most every ``ttl_s`` (concurrent callers share one build)."""

    def __init__(self, gateway: Gateway, started_at: float, ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._gateway = gateway
        self._started_at = started_at
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._doc: dict[str, Any] | None = None
        self._built_at = -math.inf

    async def get(self) -> dict[str, Any]:
        async with self._lock:
            now = self._clock()
            if self._doc is None or now - self._built_at >= self._ttl_s:
                live = metrics.shared_values(LIVE_SERIES)
                self._doc = await build(StatsContext(self._gateway, now, self._started_at, live))
                self._built_at = now
            return self._doc


def _total(values: dict[str, dict[Any, float]], name: str) -> float:
    return sum(values.get(name, {}).values())


def _rate(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None
