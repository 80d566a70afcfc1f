"""How fast each backend answered lately: latency and time to first token, from the request log.

One bounded sample of the ledger (the newest ``SAMPLE`` requests a backend answered in the last
``WINDOW_S``), summarized per backend and per backend model as nearest-rank percentiles. /statsz and
/v1/providers show the same numbers. Durable, so every worker agrees (within one flush interval).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from appliance.storage import stats_repo
from appliance.storage.db import Database

WINDOW_S = 300
SAMPLE = 5000  # percentiles over at most the newest this many requests of the window

Spread = dict[str, float | int]  # {"p50", "p95", "samples"}


@dataclass(frozen=True, slots=True)
class Timing:
    latency_ms: Spread | None = None  # every answer, whole or streamed
    ttft_ms: Spread | None = None  # streams only: a whole answer's first token is its last

    def as_fields(self) -> dict[str, Spread | None]:
        return {"latency_ms": self.latency_ms, "ttft_ms": self.ttft_ms}


NONE = Timing()


@dataclass(frozen=True, slots=True)
class Timings:
    backends: dict[str, Timing] = field(default_factory=dict)
    targets: dict[tuple[str, str], Timing] = field(default_factory=dict)  # (backend, backend model)

    def of(self, backend: str, model: str | None = None) -> Timing:
        """The backend's, or with ``model`` that backend model's (NONE: nothing in the window)."""
        found = self.backends.get(backend) if model is None else self.targets.get((backend, model))
        return found or NONE


Row = tuple[str, str | None, float, float | None]  # backend, backend model, latency ms, ttft ms (streams)


def summarize(rows: Iterable[Row]) -> Timings:
    by_backend: dict[str, tuple[list[float], list[float]]] = {}
    by_target: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for backend, model, latency, ttft in rows:
        groups = [by_backend.setdefault(backend, ([], []))]
        if model is not None:
            groups.append(by_target.setdefault((backend, model), ([], [])))
        for latencies, ttfts in groups:
            latencies.append(latency)
            if ttft is not None:
                ttfts.append(ttft)
    return Timings({name: _timing(*values) for name, values in by_backend.items()},
                   {target: _timing(*values) for target, values in by_target.items()})


def _timing(latencies: list[float], ttfts: list[float]) -> Timing:
    return Timing(spread(latencies), spread(ttfts))


def spread(values: Iterable[float]) -> Spread | None:
    """p50 and p95 (nearest rank) and how many values; None for none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return {"p50": percentile(ordered, 0.5), "p95": percentile(ordered, 0.95), "samples": len(ordered)}


def percentile(ordered: list[float], q: float) -> float:
    """Nearest rank on a sorted list."""
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return round(ordered[index], 3)


async def recent(db: Database, now: float, window_s: float = WINDOW_S, sample: int = SAMPLE) -> Timings:
    return summarize(await stats_repo.backend_timings(db, now - window_s, sample))


class RecentTimings:
    """One worker's latest summary, rebuilt at most every ``ttl_s``: many pollers cost one query a second."""

    def __init__(self, db: Database, ttl_s: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._timings = Timings()
        self._built_at = -math.inf

    async def get(self) -> Timings:
        async with self._lock:
            now = self._clock()
            if now - self._built_at >= self._ttl_s:
                self._timings = await recent(self._db, now)
                self._built_at = now
            return self._timings
