"""Rate limits, concurrency caps and budgets that hold across all workers.

The live numbers sit in one table of shared memory that the main process creates before the workers
start (they are separate processes: a per-worker count would let rpm=60 pass 120 a minute). A row
("slot") belongs to a key or a model and holds:

- a sliding window of ``window_s`` in 60 buckets for requests and for tokens (so "60 a minute" means at
  most 60 in any minute, not 60 per clock minute),
- requests in flight, one counter per worker (a worker that dies takes its count with it),
- the current budget period's spend and reservations.

Every check-and-update happens under one lock, in microseconds, never on disk. Clocks are injectable.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.common.errors import GatewayError
from appliance.storage.shared_rows import SharedRows, tag_of

BUCKETS = 60
MAX_WORKERS = 64  # ServerSettings.workers allows at most this many


class _Slot(ctypes.Structure):
    _fields_ = [
        ("tag", ctypes.c_uint64),  # whose counters these are; a new owner starts from zero
        ("epoch", ctypes.c_int64),  # absolute index of the newest bucket
        ("req_total", ctypes.c_double),
        ("tok_total", ctypes.c_double),
        ("req", ctypes.c_double * BUCKETS),
        ("tok", ctypes.c_double * BUCKETS),
        ("period", ctypes.c_int64),
        ("spent_usd", ctypes.c_double),
        ("spent_tokens", ctypes.c_double),
        ("reserved_usd", ctypes.c_double),
        ("reserved_tokens", ctypes.c_double),
        ("inflight", ctypes.c_int32 * MAX_WORKERS),
        ("inflight_total", ctypes.c_int32),  # the sum of inflight, kept so a check needs no loop
    ]


@functools.lru_cache(maxsize=8192)
def _cached_tag(owner: str) -> int:
    return tag_of(owner)


class SharedTable(SharedRows):
    """The limit counters: a row per key (by slot), then one per limited model."""

    def __init__(self, size: int, *, shared: bool = True) -> None:
        super().__init__(_Slot, size, shared=shared)


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits to enforce: a key's or a model's."""

    owner: str  # key id or "model:<name>"
    slot: int
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_usd: float | None = None
    budget_tokens: int | None = None
    budget_period: str | None = None
    budget_counts: str = "price"  # what budget_usd counts: price (token prices), compute, or both

    @property
    def tag(self) -> int:
        return _cached_tag(self.owner)

    @property
    def counts_price(self) -> bool:
        return self.budget_counts != "compute"

    @property
    def counts_compute(self) -> bool:
        return self.budget_counts != "price"

    def charged(self, cost: float, compute_cost: float) -> float:
        """What a request that cost ``cost`` in token prices and ``compute_cost`` in compute spends of budget_usd."""
        return (cost if self.counts_price else 0.0) + (compute_cost if self.counts_compute else 0.0)


@dataclass(slots=True)
class Admission:
    """What a request reserved; handed back to settle() when it ends."""

    scopes: tuple[Scope, ...]
    tokens: float
    cost: float
    counts_tokens: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    ident: str = ""  # in Redis: its entry in the in-flight sets of the scopes with a max_concurrent


def period_of(kind: str, now: float) -> int:
    """Calendar-aligned UTC budget periods, numbered: days, weeks from a Monday, months."""
    days = int(now // 86400)
    if kind == "day":
        return days
    if kind == "week":
        return (days + 3) // 7  # 1970-01-01 was a Thursday
    return _month_of_day(days)


@functools.lru_cache(maxsize=64)
def _month_of_day(days: int) -> int:
    """Months since year 0 of a day number (cached: the hot path asks for today, over and over)."""
    date = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    return date.year * 12 + date.month - 1


def period_start_day(kind: str, now: float) -> str:
    """The first day (YYYY-MM-DD) of the period that contains ``now``."""
    date = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if kind == "week":
        date -= dt.timedelta(days=date.weekday())
    elif kind == "month":
        date = date.replace(day=1)
    return date.isoformat()


def period_end(kind: str, now: float) -> float:
    date = dt.datetime.fromisoformat(period_start_day(kind, now)).replace(tzinfo=dt.UTC)
    if kind == "day":
        date += dt.timedelta(days=1)
    elif kind == "week":
        date += dt.timedelta(days=7)
    else:
        date = date.replace(year=date.year + date.month // 12, month=date.month % 12 + 1)
    return date.timestamp()


def duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: 250ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


def worker_index() -> int:
    """This worker's column for in-flight counts: Sanic names workers Sanic-Server-<n>-0."""
    name = os.environ.get("SANIC_WORKER_NAME", "")
    parts = name.split("-")
    return int(parts[2]) % MAX_WORKERS if len(parts) >= 3 and parts[2].isdigit() else 0


class Limiter:
    def __init__(self, table: SharedTable, window_s: float, worker: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._window = window_s
        self._bucket_s = window_s / BUCKETS
        self._worker = worker
        self._clock = clock

    @property
    def window_s(self) -> float:
        return self._window

    def forget_worker(self) -> None:
        """At worker start: whatever a dead predecessor in this column had in flight is gone."""
        with self._table.lock:
            for slot in self._table.slots:
                slot.inflight_total -= slot.inflight[self._worker]
                slot.inflight[self._worker] = 0

    # ---------------------------------------------------------------- slot bookkeeping (under the lock)

    def _slot(self, scope: Scope, now: float) -> Any:
        slot = self._table.slots[scope.slot]
        tag = scope.tag
        if slot.tag != tag:
            ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(_Slot))
            slot.tag = tag
        bucket = int(now // self._bucket_s)
        gap = bucket - slot.epoch
        if gap > 0:
            for i in range(1, min(gap, BUCKETS) + 1):
                index = (slot.epoch + i) % BUCKETS
                slot.req_total -= slot.req[index]
                slot.tok_total -= slot.tok[index]
                slot.req[index] = 0
                slot.tok[index] = 0
            if gap >= BUCKETS:
                slot.req_total = slot.tok_total = 0.0
            slot.epoch = bucket
        if scope.budget_period:
            period = period_of(scope.budget_period, now)
            if slot.period != period:
                slot.period = period
                slot.spent_usd = slot.spent_tokens = slot.reserved_usd = slot.reserved_tokens = 0.0
        return slot

    def _freed_in(self, slot: Any, series: str, excess: float, now: float) -> float:
        """Seconds until the oldest buckets holding ``excess`` units leave the window."""
        values = getattr(slot, series)
        dropped = 0.0
        for age in range(BUCKETS - 1, -1, -1):  # oldest first
            bucket = slot.epoch - age
            dropped += values[bucket % BUCKETS]
            if dropped >= excess:
                return max((bucket + BUCKETS) * self._bucket_s - now, self._bucket_s / 2)
        return self._window

    def _last_expiry(self, slot: Any, series: str, now: float) -> float:
        values = getattr(slot, series)
        for age in range(BUCKETS):  # newest first
            if values[(slot.epoch - age) % BUCKETS]:
                return max((slot.epoch - age + BUCKETS) * self._bucket_s - now, 0.0)
        return 0.0

    # ---------------------------------------------------------------- the two operations

    def admit(self, scopes: tuple[Scope, ...], *, tokens: float, cost: float, counts_tokens: bool = True,
              headers_for: Scope | None = None, compute: bool = False) -> Admission:
        """Check every scope and, only if all pass, count the request in all of them.

        ``cost``: the token-price estimate, reserved against budgets that count prices. ``compute``: the
        request goes to a backend with a cost_per_hour; its compute cost is known only at the end, so a budget
        that counts compute admits it while something of the budget is left.
        Raises GatewayError 429 (rate_limit_exceeded or budget_exceeded) with Retry-After.
        """
        now = self._clock()
        with self._table.lock:
            slots = [self._slot(scope, now) for scope in scopes]
            try:
                for scope, slot in zip(scopes, slots, strict=True):
                    self._check(scope, slot, tokens if counts_tokens else 0.0, cost if counts_tokens else 0.0,
                                counts_tokens and compute, now)
            except GatewayError as refused:
                if headers_for is not None:  # a refusal shows the client's standing too, as OpenAI's does
                    shown = self._headers(headers_for, slots[scopes.index(headers_for)], now)
                    refused.headers = {**shown, **refused.headers}
                raise
            bucket = int(now // self._bucket_s) % BUCKETS
            for scope, slot in zip(scopes, slots, strict=True):
                slot.req[bucket] += 1
                slot.req_total += 1
                slot.inflight[self._worker] += 1
                slot.inflight_total += 1
                if counts_tokens:
                    slot.tok[bucket] += tokens
                    slot.tok_total += tokens
                    if scope.budget_period:
                        slot.reserved_usd += cost if scope.counts_price else 0.0
                        slot.reserved_tokens += tokens
            headers = self._headers(headers_for, slots[scopes.index(headers_for)], now) if headers_for else {}
        return Admission(scopes, tokens, cost, counts_tokens, headers)

    def _check(self, scope: Scope, slot: Any, tokens: float, cost: float, compute: bool, now: float) -> None:
        if scope.rpm is not None and slot.req_total + 1 > scope.rpm:
            raise refusal(scope, "requests", self._window, self._freed_in(slot, "req", slot.req_total + 1 - scope.rpm,
                                                                         now))
        if scope.tpm is not None and tokens:
            if tokens > scope.tpm:
                raise refusal(scope, "too_large", self._window, tokens=tokens)
            if slot.tok_total + tokens > scope.tpm:
                raise refusal(scope, "tokens", self._window,
                              self._freed_in(slot, "tok", slot.tok_total + tokens - scope.tpm, now))
        if scope.max_concurrent is not None and slot.inflight_total + 1 > scope.max_concurrent:
            raise refusal(scope, "concurrency", self._window, 1.0)
        if scope.budget_period:
            if scope.budget_usd is not None and over_budget(scope, slot.spent_usd + slot.reserved_usd, cost, compute):
                raise refusal(scope, "budget_usd", self._window)
            if scope.budget_tokens is not None and tokens and \
                    slot.spent_tokens + slot.reserved_tokens + tokens > scope.budget_tokens:
                raise refusal(scope, "budget_tokens", self._window)

    def _headers(self, scope: Scope, slot: Any, now: float) -> dict[str, str]:
        return rate_headers(scope, slot.req_total, slot.tok_total,
                            self._last_expiry(slot, "req", now) if scope.rpm is not None else 0.0,
                            self._last_expiry(slot, "tok", now) if scope.tpm is not None else 0.0)

    def settle(self, admission: Admission, *, tokens: float, cost: float, compute_cost: float = 0.0) -> None:
        """The request ended: replace the estimates with what it really used (token prices ``cost``, and
        ``compute_cost`` for budgets that count compute), release its place."""
        if admission.settled:
            return
        admission.settled = True
        now = self._clock()
        with self._table.lock:
            for scope in admission.scopes:
                if self._table.slots[scope.slot].tag != scope.tag:
                    continue  # the key was deleted and its slot reused meanwhile: nothing of ours is left
                slot = self._slot(scope, now)
                if slot.inflight[self._worker] > 0:
                    slot.inflight[self._worker] -= 1
                    slot.inflight_total -= 1
                if not admission.counts_tokens:
                    continue
                bucket = int(now // self._bucket_s) % BUCKETS
                delta = tokens - admission.tokens
                slot.tok[bucket] += delta
                slot.tok_total = max(0.0, slot.tok_total + delta)
                if scope.budget_period:
                    reserved = admission.cost if scope.counts_price else 0.0
                    slot.reserved_usd = max(0.0, slot.reserved_usd - reserved)
                    slot.reserved_tokens = max(0.0, slot.reserved_tokens - admission.tokens)
                    slot.spent_usd += scope.charged(cost, compute_cost)
                    slot.spent_tokens += tokens

    def preload(self, scope: Scope, *, spent_usd: float, spent_tokens: float) -> None:
        """At start (main process): what the current budget period already used, from the ledger."""
        now = self._clock()
        with self._table.lock:
            slot = self._slot(scope, now)
            slot.spent_usd = spent_usd
            slot.spent_tokens = spent_tokens

    def budget_state(self, scope: Scope) -> dict[str, Any]:
        """Spend and what is left in the current period (for GET /v1/key)."""
        now = self._clock()
        with self._table.lock:
            slot = self._slot(scope, now)
            spent_usd, spent_tokens = slot.spent_usd, slot.spent_tokens
            requests, tokens = slot.req_total, slot.tok_total
        return budget_view(scope, now, requests, tokens, spent_usd, spent_tokens)


# ---------------------------------------------------------------- shared by this limiter and the one in Redis


def rate_headers(scope: Scope, requests: float, tokens: float, reset_requests_s: float,
                 reset_tokens_s: float) -> dict[str, str]:
    """The x-ratelimit-* headers of a scope holding ``requests`` and ``tokens`` in its window."""
    headers = {}
    if scope.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(scope.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, int(scope.rpm - requests)))
        headers["x-ratelimit-reset-requests"] = duration(reset_requests_s)
    if scope.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(scope.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, int(scope.tpm - tokens)))
        headers["x-ratelimit-reset-tokens"] = duration(reset_tokens_s)
    return headers


def budget_view(scope: Scope, now: float, requests: float, tokens: float, spent_usd: float,
                spent_tokens: float) -> dict[str, Any]:
    """What GET /v1/key shows of a scope's window and budget period."""
    state: dict[str, Any] = {"requests_in_window": int(requests), "tokens_in_window": int(tokens)}
    if scope.budget_period:
        state.update(period=scope.budget_period, period_start=period_start_day(scope.budget_period, now),
                     spent_usd=round(spent_usd, 9), spent_tokens=int(spent_tokens),
                     resets_at=int(period_end(scope.budget_period, now)))
        if scope.budget_usd is not None:
            state["remaining_usd"] = round(max(0.0, scope.budget_usd - spent_usd), 9)
        if scope.budget_tokens is not None:
            state["remaining_tokens"] = max(0, int(scope.budget_tokens - spent_tokens))
    return state


def refusal(scope: Scope, limit: str, window_s: float, wait_s: float = 1.0, *, tokens: float = 0) -> GatewayError:
    """The 429 for a request that ``limit`` of ``scope`` refuses: requests, tokens, concurrency, too_large (the
    request alone is over tpm), budget_usd or budget_tokens; ``wait_s``: when it may pass (Retry-After)."""
    who = "this key" if not scope.owner.startswith("model:") else f"the model {scope.owner[6:]!r}"
    per = "minute" if window_s == 60 else f"{window_s:g} s"
    if limit == "requests":
        return _limited(f"Rate limit reached for {who}: {scope.rpm} requests per {per}.", wait_s, "requests")
    if limit == "tokens":
        return _limited(f"Rate limit reached for {who}: {scope.tpm} tokens per {per}.", wait_s, "tokens")
    if limit == "too_large":
        return GatewayError("rate_limit_exceeded", f"Request too large for {who}: about {int(tokens)} tokens, the "
                            f"limit is {scope.tpm} tokens per {per}.", status=429, type="rate_limit_error",
                            headers={"x-should-retry": "false"})
    if limit == "concurrency":
        return _limited(f"Too many requests in flight for {who}: at most {scope.max_concurrent}.", wait_s,
                        "concurrency")
    if limit == "budget_usd":
        return _over_budget(f"Budget of ${scope.budget_usd:g} per {scope.budget_period} used up for {who}.")
    return _over_budget(f"Budget of {scope.budget_tokens} tokens per {scope.budget_period} used up for {who}.")


def _limited(message: str, wait_s: float, limit: str) -> GatewayError:
    wait = min(max(wait_s, 0.001), 120.0)
    seconds = max(1, math.ceil(wait))
    return GatewayError("rate_limit_exceeded", message, status=429, type="rate_limit_error",
                        headers={"Retry-After": str(seconds), "retry-after-ms": str(int(wait * 1000))},
                        extra={"retry_after": seconds, "limit": limit})


def over_budget(scope: Scope, used: float, cost: float, compute: bool) -> bool:
    """Would this request overrun the scope's budget_usd, ``used`` (spent and reserved) of it already? A price
    estimate must fit what is left; a compute cost (unknown until the end) needs something left. A request that
    costs nothing the budget counts always passes (a $0 model never consumes or is blocked by a USD budget)."""
    price = cost if scope.counts_price else 0.0
    used += price
    if compute and scope.counts_compute:
        return used >= scope.budget_usd  # type: ignore[operator]
    return price > 0 and used > scope.budget_usd  # type: ignore[operator]


def _over_budget(message: str) -> GatewayError:
    return GatewayError("budget_exceeded", message, status=429, type="rate_limit_error")


# ---------------------------------------------------------------------------------------- whose limits


@functools.lru_cache(maxsize=4096)
def key_scope(principal: Any) -> Scope | None:
    """The limits of an API key (a Principal), or None when it has none to enforce."""
    if principal.slot is None or not (principal.rpm or principal.tpm or principal.max_concurrent
                                      or principal.budget_period):
        return None
    return Scope(principal.key_id, principal.slot, principal.rpm, principal.tpm, principal.max_concurrent,
                 principal.budget_usd, principal.budget_tokens, principal.budget_period, principal.budget_counts)


class ModelScopes:
    """Per-model limits from [[models]], in the slots after the keys' ones.

    An entry names a served model (``backend/model`` or a model name) or is an alias whose target does;
    its limits bind that backend model for every key.
    """

    def __init__(self, models: list[Any], first_slot: int) -> None:
        self._by_name: dict[str, Scope] = {}
        limited = [m for m in models if m.rpm or m.tpm or m.max_concurrent]
        for i, model in enumerate(limited):
            name = model.served_model
            self._by_name[name] = Scope(f"model:{name}", first_slot + i, model.rpm, model.tpm, model.max_concurrent)

    def __len__(self) -> int:
        return len(self._by_name)

    def of(self, backend: str, model: str) -> Scope | None:
        if not self._by_name:
            return None
        return self._by_name.get(f"{backend}/{model}") or self._by_name.get(model)


def table_size(settings: Any) -> int:
    """Slots the shared table needs: every key's, then every limited model's."""
    return settings.limits.key_slots + len(ModelScopes(settings.models, 0))
