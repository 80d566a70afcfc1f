"""Retries, circuit breakers and backend load, shared by every worker: pure logic, no I/O.

- Which failures are worth another try (``retryable``), which count against a backend's breaker
  (``breaker_failure``: not a 429), how long to wait first (``backoff``, which honours an upstream
  ``Retry-After``, read by ``retry_after_of``).
- A circuit breaker per backend (``Breakers``): closed -> open after ``breaker_failures`` consecutive
  failures, or a failure share of at least ``breaker_failure_rate`` over ``breaker_window_s`` once the
  window holds ``breaker_min_requests``; open backends are skipped; after ``breaker_cooldown_s`` exactly
  one caller, across all workers, gets a trial (half-open); its success closes the breaker, its failure
  opens it again. A trial that never reports back expires after another cooldown.
- Requests in flight per backend (one counter per worker, plus the other nodes' sum with ``[state] url``) and
  the backend's own latest load sample, combined by ``Breakers.busy`` for least_busy routing.
- The backend's busy time, shared out among the requests that ran together (processor sharing): each
  request's share of the busy seconds (``begin`` gives a mark, ``share_since`` the share since it), which
  ``cost_per_hour`` turns into a compute cost; and the total busy seconds, for /metrics.
- Parsers for the load signals backends expose (vLLM and llama.cpp /metrics, llama.cpp /slots); the
  polling is done elsewhere.

The state lives in one table of shared memory made by the main process before the workers start
(``BackendTable``, like limits.SharedTable): a row per backend (and per ``backend/model`` whose
requests are counted), found by a 64-bit tag of its name. Every operation takes the lock at most once,
for microseconds. Rows are never freed: backends and their models are few.
"""

from __future__ import annotations

import ctypes
import email.utils
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from appliance.common.config import RoutingSettings
from appliance.common.errors import GatewayError
from appliance.providers.load import Load
from appliance.storage.shared_rows import SharedRows, tag_of

RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))
# Transport-level failures: always worth another try (elsewhere, or after a pause).
_RETRY_CODES = frozenset(("backend_unreachable", "backend_timeout", "backend_overloaded"))
# The gateway's own refusals and outcomes that another try cannot change.
_FINAL_CODES = frozenset(("budget_exceeded", "unsupported", "no_healthy_backend", "shutting_down", "client_closed",
                          "state_unavailable"))

BACKEND_SLOTS = 1024  # backends, plus backend/model pairs counted in flight
BUCKETS = 30  # of the failure-rate window
MAX_WORKERS = 64  # ServerSettings.workers allows at most this many

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")
_PROBE_UP = (None, True, False)


# ---------------------------------------------------------------------------------------- retries


def retryable_status(status: int) -> bool:
    """An upstream status worth another try: 429, 500, 502, 503, 504 (never another 4xx)."""
    return status in RETRY_STATUSES


def retryable(err: GatewayError) -> bool:
    """A failed attempt that another attempt (same target later, or the next one) may fix.

    Connect errors, timeouts and overload always; upstream answers by their status (429, 5xx above);
    never the gateway's own refusals (its rate limiter's 429 carries ``extra["limit"]``) nor anything
    marked ``x-should-retry: false``.
    """
    if err.code in _RETRY_CODES:
        return True
    if err.code in _FINAL_CODES or (err.code == "rate_limit_exceeded" and "limit" in err.extra):
        return False
    for name, value in err.headers.items():
        if name.lower() == "x-should-retry" and value.strip().lower() == "false":
            return False
    return err.status in RETRY_STATUSES


def breaker_failure(err: GatewayError) -> bool:
    """Does this failed attempt count against the backend's breaker (``record(ok=False)``)?

    What is retryable, except a 429: a rate-limited backend is up and said when to come back; the
    retry (after its Retry-After) or the failover handles it, and it must not keep the backend out
    for a whole cooldown. Other 4xx are the request's fault: the backend counts as healthy.
    """
    return err.status != 429 and retryable(err)


def backoff(attempt: int, *, base_s: float, max_s: float, retry_after_s: float | None = None,
            rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt + 1`` (attempt 0 is the first retry).

    Full jitter: uniform in ``[0, base_s * 2**attempt]``; at least ``retry_after_s`` when the upstream
    gave one; never more than ``max_s``.
    """
    ceiling = min(max_s, math.ldexp(base_s, min(attempt, 64)))
    delay = rng.random() * ceiling
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return min(delay, max_s)


def retry_after_of(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds an upstream asked us to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an
    HTTP date, relative to ``now``, default the wall clock). None when absent or unreadable."""
    seconds: float | None = None
    for name, value in headers.items():
        key = name.lower()
        if key == "retry-after-ms":
            try:
                ms = float(value)
            except ValueError:
                continue
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000
        elif key == "retry-after" and seconds is None:
            seconds = _retry_after_value(value, now)
    return seconds


def _retry_after_value(value: str, now: float | None) -> float | None:
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if date.tzinfo is None:
            return None
        seconds = date.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# ---------------------------------------------------------------------------------------- shared table


class _Slot(ctypes.Structure):
    _fields_ = [
        ("tag", ctypes.c_uint64),  # whose row this is (0: free)
        ("state", ctypes.c_int32),  # CLOSED, OPEN, HALF_OPEN
        ("trial", ctypes.c_int32),  # 1 while a half-open trial is out
        ("failures", ctypes.c_int32),  # consecutive
        ("ok_total", ctypes.c_int32),
        ("fail_total", ctypes.c_int32),
        ("slots_idle", ctypes.c_int32),
        ("slots_total", ctypes.c_int32),  # 0: not known
        ("opened_at", ctypes.c_double),
        ("trial_at", ctypes.c_double),
        ("epoch", ctypes.c_int64),  # absolute index of the newest window bucket
        ("ok", ctypes.c_int32 * BUCKETS),
        ("fail", ctypes.c_int32 * BUCKETS),
        ("inflight", ctypes.c_int32 * MAX_WORKERS),  # per worker: a dead worker's count can be dropped
        ("inflight_sum", ctypes.c_int32),  # of the above, so a read needs no loop
        ("queue_waiting", ctypes.c_double),
        ("running", ctypes.c_double),
        ("sampled_at", ctypes.c_double),  # 0: no load sample
        ("probe", ctypes.c_int32),  # the latest health probe, any worker: 0 none yet, 1 up, 2 down
        ("probed_at", ctypes.c_double),
        # Processor sharing (what a local model costs): share_clock grows by dt / n while n >= 1 requests are
        # in flight (all workers), so a request's share of the busy time is share_clock(end) - share_clock(start).
        ("share_clock", ctypes.c_double),
        ("clock_at", ctypes.c_double),  # wall time of the last advance
        ("busy_s", ctypes.c_double),  # seconds with at least one request in flight
        # Fair admission (core/admission.py): requests waiting in the appliance's queue for this backend, those let
        # in but not yet begun (they hold a place), the capacity last applied, the queue's virtual time (the start
        # tag of the latest request let in) and arrival counter, and how fast requests finish (the drain rate).
        ("queued", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("capacity", ctypes.c_int32),  # 0: none known (no queue)
        ("vtime", ctypes.c_double),
        ("arrivals", ctypes.c_uint64),
        ("finished_at", ctypes.c_double),  # wall time of the latest end
        ("finish_gap_s", ctypes.c_double),  # smoothed seconds between two ends (0: not measured yet)
        # [state] url (core/shared_breakers.py): requests in flight on the other nodes, and the version of the
        # shared breaker state this row last took or wrote.
        ("remote_inflight", ctypes.c_int32),
        ("remote_version", ctypes.c_int64),
    ]


class BackendTable(SharedRows):
    """Rows per backend in shared memory plus the lock that guards them; made in the main process.

    The forked workers inherit the buffer and the lock. ``shared=False``: plain process memory, for
    single-process use and tests.
    """

    def __init__(self, size: int = BACKEND_SLOTS, *, shared: bool = True) -> None:
        super().__init__(_Slot, size, shared=shared)

    def find(self, name: str, *, claim: bool = True) -> Any:
        """The row of ``name``, claimed if new (linear probing); None when the table is full, or, without
        ``claim``, when ``name`` has no row yet.

        Call under the lock.
        """
        return self.find_tag(tag_of(name), claim=claim)

    def find_tag(self, tag: int, *, claim: bool = True) -> Any:
        """``find`` by the name's tag. Call under the lock."""
        slots = self.slots
        start = tag % self.size
        for step in range(self.size):
            slot = slots[(start + step) % self.size]
            if slot.tag == tag:
                return slot
            if slot.tag == 0:
                if not claim:
                    return None
                slot.tag = tag
                return slot
        return None


def _tick(slot: Any, now: float) -> None:
    """Advance ``slot``'s share clock and busy time to ``now`` at the count in flight so far. Under the lock.

    The clock is wall time read by several processes: a ``now`` behind the last advance adds nothing.
    """
    elapsed = now - slot.clock_at
    if elapsed <= 0:
        return
    running = slot.inflight_sum
    if running > 0:
        slot.share_clock += elapsed / running
        slot.busy_s += elapsed
    slot.clock_at = now


def _finished(slot: Any, now: float) -> None:
    """A request on ``slot``'s backend ended: fold the gap since the previous end into the drain rate (a
    smoothed mean, so one long answer does not swing it). Under the lock."""
    if slot.finished_at and now > slot.finished_at:
        gap = min(now - slot.finished_at, _MAX_FINISH_GAP_S)
        slot.finish_gap_s = gap if not slot.finish_gap_s else 0.8 * slot.finish_gap_s + 0.2 * gap
    slot.finished_at = now


_MAX_FINISH_GAP_S = 60.0  # an idle hour is no measure of how fast a busy backend drains


# ---------------------------------------------------------------------------------------- breakers


class Breakers:
    """One worker's handle on the shared breakers, in-flight counts and load samples.

    ``worker`` is this process's column for in-flight counts; ``clock`` is wall time (shared by all
    processes), injectable. A backend beyond the table's capacity has no breaker (always allowed).
    ``load_stale_s``: a load sample older than this is ignored (default 3 probe intervals).
    """

    def __init__(self, table: BackendTable, settings: RoutingSettings, worker: int = 0,
                 clock: Callable[[], float] = time.time, *, load_stale_s: float | None = None) -> None:
        self._table = table
        self._settings = settings
        self._worker = worker % MAX_WORKERS
        self._clock = clock
        self._bucket_s = settings.breaker_window_s / BUCKETS
        self._stale_s = load_stale_s if load_stale_s is not None else 3 * settings.probe_interval_s
        self._rows: dict[str, Any] = {}  # name -> its row (rows are never freed, so this never goes stale)
        # [state] url (core/shared_breakers.py): told of each open and close; while the gate says so, half-open
        # trials are granted by it (one across the nodes) rather than by ``allow``.
        self.on_change: Callable[[int, int, float], None] | None = None
        self.trial_gate: Callable[[], bool] | None = None

    def reconfigure(self, settings: RoutingSettings) -> None:
        """A reload's routing settings (the bucket width stays: routing.breaker_window_s needs a restart)."""
        self._settings = settings

    def _row(self, name: str, *, claim: bool = True) -> Any:
        """Under the lock."""
        slot = self._rows.get(name)
        if slot is None:
            slot = self._table.find(name, claim=claim)
            if slot is not None:
                self._rows[name] = slot
        return slot

    def _known(self, name: str, *, claim: bool = True) -> Any:
        """The row, taking the lock only the first time this process meets the name."""
        slot = self._rows.get(name)
        if slot is None:
            with self._table.lock:
                slot = self._row(name, claim=claim)
        return slot

    @property
    def worker(self) -> int:
        """This process's column for in-flight counts."""
        return self._worker

    @property
    def cooldown_s(self) -> float:
        return self._settings.breaker_cooldown_s

    def now(self) -> float:
        return self._clock()

    def rows(self) -> Any:
        """Every row of the table (a claimed one has a tag); read them under ``lock``."""
        return self._table.slots

    @property
    def lock(self) -> Any:
        """The table's lock (core/admission.py keeps its queue under it too)."""
        return self._table.lock

    def row(self, name: str) -> Any:
        """The shared row of backend ``name`` (None: the table is full); read it freely, write it under ``lock``."""
        return self._known(name)

    def forget_worker(self) -> None:
        """At worker start: whatever a dead predecessor in this column had in flight is gone."""
        with self._table.lock:
            now = self._clock()
            for slot in self._table.slots:
                if slot.tag:
                    _tick(slot, now)  # the busy time until now was shared with the dead requests too
                    slot.inflight_sum -= slot.inflight[self._worker]
                    slot.inflight[self._worker] = 0

    # ------------------------------------------------------------------ the breaker

    def allow(self, backend: str) -> bool:
        """May a request go to ``backend`` now? True while closed; for an open breaker past its
        cooldown, True for exactly one caller (the trial) across all processes."""
        slot = self._rows.get(backend)
        if slot is not None and slot.state == CLOSED:
            return True  # the common case, read without the lock: a stale read lets one more through
        now = self._clock()
        cooldown = self._settings.breaker_cooldown_s
        with self._table.lock:
            slot = self._row(backend)
            if slot is None or slot.state == CLOSED:
                return True
            if slot.state == OPEN:
                if now - slot.opened_at < cooldown or self._gated():
                    return False
                slot.state = HALF_OPEN
            elif slot.trial and (now - slot.trial_at < cooldown or self._gated()):
                return False  # half-open, the trial is out (one that never reported expires after a cooldown)
            slot.trial = 1
            slot.trial_at = now
            return True

    def _gated(self) -> bool:
        return self.trial_gate is not None and self.trial_gate()

    def record(self, backend: str, ok: bool) -> None:
        """The outcome of an attempt (or a probe) against ``backend``."""
        changed = self._record(backend, ok)
        if changed is not None and self.on_change is not None:
            self.on_change(*changed)

    def _record(self, backend: str, ok: bool) -> tuple[int, int, float] | None:
        """``record``; returns the change of state it made: (tag, OPEN or CLOSED, opened_at), else None."""
        now = self._clock()
        settings = self._settings
        with self._table.lock:
            slot = self._row(backend)
            if slot is None:
                return None
            self._advance(slot, now)
            bucket = int(now // self._bucket_s) % BUCKETS
            if ok:
                slot.ok[bucket] += 1
                slot.ok_total += 1
            else:
                slot.fail[bucket] += 1
                slot.fail_total += 1
            state = slot.state
            if state == HALF_OPEN:
                # The first outcome while half-open decides (the trial's, or a straggler's: as telling).
                if ok:
                    self.close_row(slot)
                    return slot.tag, CLOSED, 0.0
                slot.failures += 1
                self.open_row(slot, now)
                return slot.tag, OPEN, now
            if state == CLOSED:
                if ok:
                    slot.failures = 0
                    return None
                slot.failures += 1
                seen = slot.ok_total + slot.fail_total
                if slot.failures >= settings.breaker_failures or (
                        seen >= settings.breaker_min_requests
                        and slot.fail_total >= settings.breaker_failure_rate * seen):
                    self.open_row(slot, now)
                    return slot.tag, OPEN, now
            return None  # OPEN: a straggler that started before it opened; counted in the window only.

    @staticmethod
    def open_row(slot: Any, now: float) -> None:
        """Open ``slot``'s breaker (under the lock)."""
        slot.state = OPEN
        slot.opened_at = now
        slot.trial = 0

    @staticmethod
    def close_row(slot: Any) -> None:
        """Close ``slot``'s breaker and forget its window (under the lock)."""
        slot.state = CLOSED
        slot.failures = slot.trial = 0
        slot.opened_at = slot.trial_at = 0.0
        slot.ok_total = slot.fail_total = 0
        ctypes.memset(ctypes.addressof(slot.ok), 0, ctypes.sizeof(slot.ok))
        ctypes.memset(ctypes.addressof(slot.fail), 0, ctypes.sizeof(slot.fail))

    def _advance(self, slot: Any, now: float) -> None:
        """Drop the window buckets that slid out. Under the lock."""
        bucket = int(now // self._bucket_s)
        gap = bucket - slot.epoch
        if gap <= 0:
            return
        if gap >= BUCKETS:
            ctypes.memset(ctypes.addressof(slot.ok), 0, ctypes.sizeof(slot.ok))
            ctypes.memset(ctypes.addressof(slot.fail), 0, ctypes.sizeof(slot.fail))
            slot.ok_total = slot.fail_total = 0
        else:
            for i in range(1, gap + 1):
                index = (slot.epoch + i) % BUCKETS
                slot.ok_total -= slot.ok[index]
                slot.fail_total -= slot.fail[index]
                slot.ok[index] = slot.fail[index] = 0
        slot.epoch = bucket

    def _wait(self, slot: Any, now: float) -> float:
        """Seconds until ``slot`` lets a trial through (0: now)."""
        cooldown = self._settings.breaker_cooldown_s
        if slot.state == OPEN:
            return max(0.0, slot.opened_at + cooldown - now)
        if slot.state == HALF_OPEN and slot.trial:
            return max(0.0, slot.trial_at + cooldown - now)
        return 0.0

    def retry_after(self, backends: Iterable[str]) -> float:
        """Seconds until the first of ``backends`` accepts a request again (no backends: a cooldown)."""
        now = self._clock()
        soonest: float | None = None
        with self._table.lock:
            for name in backends:
                slot = self._row(name)
                wait = 0.0 if slot is None else self._wait(slot, now)
                soonest = wait if soonest is None else min(soonest, wait)
        return self._settings.breaker_cooldown_s if soonest is None else soonest

    def state(self, backend: str) -> dict[str, Any]:
        """The breaker, in-flight count and load of ``backend``, for /ready and /statsz."""
        now = self._clock()
        with self._table.lock:
            slot = self._row(backend)
            if slot is None:
                return {"state": "closed", "consecutive_failures": 0, "opened_at": None, "retry_after_s": 0.0,
                        "window_ok": 0, "window_fail": 0, "in_flight": 0, "load": None, "up": None,
                        "probed_at": None, "busy_s": 0.0, "queued": 0, "capacity": None}
            self._advance(slot, now)
            _tick(slot, now)
            load = None
            if slot.sampled_at:
                load = {"queue_waiting": slot.queue_waiting, "running": slot.running,
                        "slots_idle": slot.slots_idle if slot.slots_total else None,
                        "slots_total": slot.slots_total or None, "age_s": round(now - slot.sampled_at, 3)}
            return {
                "state": STATE_NAMES[slot.state],
                "consecutive_failures": slot.failures,
                "opened_at": slot.opened_at if slot.state != CLOSED else None,
                "retry_after_s": round(self._wait(slot, now), 3),
                "window_ok": slot.ok_total,
                "window_fail": slot.fail_total,
                "in_flight": slot.inflight_sum + slot.remote_inflight,  # all nodes
                "load": load,
                "up": _PROBE_UP[slot.probe],
                "probed_at": slot.probed_at or None,
                "busy_s": slot.busy_s,
                "queued": slot.queued,
                "capacity": slot.capacity or None,
            }

    def set_probe(self, backend: str, up: bool, at: float | None = None) -> None:
        """The outcome of a health probe (any worker's: the latest one is what every worker reports)."""
        when = self._clock() if at is None else at
        with self._table.lock:
            slot = self._row(backend)
            if slot is not None and when >= slot.probed_at:
                slot.probe = 1 if up else 2
                slot.probed_at = when

    # ------------------------------------------------------------------ in flight and load

    def try_begin(self, backend: str, model: str | None, capacity: int) -> float | None:
        """``begin``, unless ``backend`` is full: ``capacity`` or more in flight (all workers) or let in from its
        queue, or requests already waiting there (a newcomer never passes them). None when full: the caller
        queues (core/admission.py). One lock, as ``begin`` alone takes."""
        with self._table.lock:
            slot = self._row(backend)
            if slot is not None:
                slot.capacity = capacity
                if slot.queued or slot.inflight_sum + slot.reserved >= capacity:
                    return None
            return self._begin_locked(slot, f"{backend}/{model}" if model is not None else None)

    def begin(self, backend: str, model: str | None = None) -> float:
        """A request to ``backend`` (and its ``model``, counted apart too) starts; pair with ``end``.

        Returns the backend's share clock at this moment: the mark ``share_since`` measures this
        request's share of the busy time from.
        """
        with self._table.lock:
            return self._begin_locked(self._row(backend), f"{backend}/{model}" if model is not None else None)

    def begin_locked(self, backend: str, model: str | None = None) -> float:
        """``begin``, the lock already held (a request let in from the queue: core/admission.py)."""
        return self._begin_locked(self._row(backend), f"{backend}/{model}" if model is not None else None)

    def row_of_tag(self, tag: int) -> Any:
        """The row whose name has ``tag`` (None: no such row). Under the lock."""
        return self._table.find_tag(tag, claim=False)

    def _begin_locked(self, slot: Any, target: str | None) -> float:
        mark = 0.0
        if slot is not None:
            _tick(slot, self._clock())  # before the count changes: until now, n was one less
            mark = slot.share_clock
            slot.inflight[self._worker] += 1
            slot.inflight_sum += 1
        if target is not None and (slot := self._row(target)) is not None:
            slot.inflight[self._worker] += 1
            slot.inflight_sum += 1
        return mark

    def end(self, backend: str, model: str | None = None) -> None:
        target = f"{backend}/{model}" if model is not None else None
        worker = self._worker
        with self._table.lock:
            slot = self._row(backend)
            if slot is not None and slot.inflight[worker] > 0:
                now = self._clock()
                _tick(slot, now)
                slot.inflight[worker] -= 1
                slot.inflight_sum -= 1
                _finished(slot, now)
            if target is not None and (slot := self._row(target)) is not None and slot.inflight[worker] > 0:
                slot.inflight[worker] -= 1
                slot.inflight_sum -= 1

    def share_since(self, backend: str, mark: float) -> float:
        """Busy seconds of ``backend`` that fell to one request in flight since ``mark`` (from ``begin``):
        each moment's time divided by the requests in flight then, all workers together."""
        with self._table.lock:
            slot = self._row(backend, claim=False)
            if slot is None:
                return 0.0
            _tick(slot, self._clock())
            return max(0.0, slot.share_clock - mark)

    def in_flight(self, backend: str, model: str | None = None) -> int:
        """Requests in flight to ``backend`` (or to its ``model``), all workers together.

        A read claims no row: any name a client writes may be asked about (/v1/providers), and rows are
        never freed.
        """
        slot = self._known(backend if model is None else f"{backend}/{model}", claim=False)
        return slot.inflight_sum + slot.remote_inflight if slot is not None else 0

    def set_load(self, backend: str, load: Load) -> None:
        """The backend's own load, as just sampled (by the poller)."""
        now = self._clock()
        with self._table.lock:
            slot = self._row(backend)
            if slot is None:
                return
            slot.queue_waiting = load.queue_waiting
            slot.running = load.running
            slot.slots_total = load.slots_total or 0
            slot.slots_idle = load.slots_idle if load.slots_idle is not None else 0
            slot.sampled_at = load.sampled_at if load.sampled_at is not None else now

    def busy(self, backend: str, model: str | None = None) -> float:
        """How loaded ``backend`` is for ``model``, lower is better (least_busy), per unit of capacity.

        With a fresh load sample (the backend's own, server-wide): ``max(running + waiting, in flight)
        + waiting``, i.e. the backend's count (samples lag, so never less than what the gateway knows is
        in flight to it) with queued requests counting twice (they have not even started), divided by
        the slot count where known (llama.cpp), else by 1. Without one: the gateway's requests in flight,
        all workers, to ``backend/model`` when a model is given (spec: Ollama's load is per model), else
        to the backend. Read without the lock: a torn read only skews one ranking.
        """
        slot = self._known(backend)
        if slot is None:
            return 0.0
        sampled_at = slot.sampled_at
        if sampled_at and self._clock() - sampled_at <= self._stale_s:
            waiting = slot.queue_waiting
            work = max(slot.running + waiting, float(slot.inflight_sum + slot.remote_inflight)) + waiting
            return work / slot.slots_total if slot.slots_total > 0 else work
        if model is not None:
            slot = self._known(f"{backend}/{model}")
            if slot is None:
                return 0.0
        return float(slot.inflight_sum + slot.remote_inflight)
