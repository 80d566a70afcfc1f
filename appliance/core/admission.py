"""Fair admission: requests beyond a backend's capacity wait in the appliance's own queue, shared by every worker,
and are let in by weighted fair queuing between keys.

A backend's capacity is its ``max_concurrency``, else what the server tells (llama.cpp /slots ``slots_total``),
else what its kind is known to hold (llama-cpp-python serves one request at a time), else none: no queue.
A request whose backend is full (``capacity`` or more in flight from all workers, counting those let in from the
queue that have not begun yet) or already has requests waiting takes a place in the queue.

Start-time fair queuing: each waiting request carries a start tag, ``max(virtual time, its key's last finish
tag)``, and a finish tag, ``start + 1 / weight``; the lowest start tag is let in first (the arrival order breaks
ties, so one key's requests keep their order), and the virtual time becomes its start tag. A key that just had a
turn waits behind a key that had none; weights 2:1 give turns 2:1 while both wait. A key's last finish tag is kept
(``KEPT`` entry) until the virtual time passes it.

The queue lives in shared memory beside the backend table and under its lock (``Breakers.lock``): one fixed pool
of ``QUEUE_SLOTS`` entries. A place is granted by whoever frees one (``released``, after ``Breakers.end``) or
by a waiter that sees room on its own poll (every ``POLL_S`` while queued: one read of its own entry); the
granted waiter then begins its attempt. A request that does not queue pays ``Breakers.try_begin``: the lock
``begin`` always took, plus one comparison.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.common.config import AdmissionSettings, BackendSettings
from appliance.common.errors import GatewayError, retry_after_headers
from appliance.core.resilience import MAX_WORKERS, Breakers
from appliance.storage.shared_rows import SharedRows, tag_of

QUEUE_SLOTS = 1024  # requests waiting (or keeping a key's last finish tag), all backends together
POLL_S = 0.003  # how often a waiter looks at its own entry
KEY_CHARS = 40  # a key id as kept for /statsz (key_ + 16 hex digits, or "anonymous")
# What a kind of server is known to serve at once when it tells nothing (llama-cpp-python takes one request at a
# time, all its models together).
KNOWN_CAPACITY = {"llama-cpp-python": 1}

FREE, WAITING, GRANTED, KEPT = 0, 1, 2, 3


class _Entry(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_int32),  # FREE, WAITING, GRANTED (let in, not begun yet), KEPT (a key's last finish)
        ("worker", ctypes.c_int32),
        ("backend", ctypes.c_uint64),  # tag of the backend's name
        ("key", ctypes.c_uint64),  # tag of the key id
        ("start", ctypes.c_double),
        ("finish", ctypes.c_double),
        ("seq", ctypes.c_uint64),  # arrival order on its backend
        ("since", ctypes.c_double),  # wall time it arrived
        ("key_id", ctypes.c_char * KEY_CHARS),
    ]


class _Queue(ctypes.Structure):
    _fields_ = [
        ("top", ctypes.c_int32),  # entries past this index were never used: scans stop here
        ("entries", _Entry * QUEUE_SLOTS),
    ]


class QueueTable(SharedRows):
    """The queue's entries in shared memory (made in the main process, like BackendTable); ``shared=False`` for
    single-process use and tests. It has no lock of its own: it is kept under the backend table's."""

    def __init__(self, *, shared: bool = True) -> None:
        super().__init__(_Queue, 1, shared=shared)

    @property
    def queue(self) -> Any:
        return self.slots[0]


@dataclass(slots=True)
class Place:
    """A request's place in the queue, while it waits."""

    index: int
    backend: str
    since: float


class FairQueue:
    """One worker's handle on the shared queue.

    ``capacities``: configured ``max_concurrency`` per backend; ``kind_of``: a backend's kind as discovered.
    ``clock``: wall time (shared by all processes), injectable; ``sleep``: how a waiter waits between polls.
    """

    def __init__(self, table: QueueTable, breakers: Breakers, settings: AdmissionSettings,
                 backends: Mapping[str, BackendSettings], kind_of: Callable[[str], str | None], worker: int = 0,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self._table = table
        self._breakers = breakers
        self._worker = worker % MAX_WORKERS
        self._kind_of = kind_of
        self._clock = clock
        self._sleep = sleep
        self._tags: dict[str, int] = {}
        self.reconfigure(settings, backends)

    def reconfigure(self, settings: AdmissionSettings, backends: Mapping[str, BackendSettings]) -> None:
        self.settings = settings
        self._configured = {name: b.max_concurrency for name, b in backends.items() if b.max_concurrency}

    def forget_worker(self) -> None:
        """At worker start: what a dead predecessor in this column had queued or been granted is gone."""
        entries = self._table.queue.entries
        with self._breakers.lock:
            for i in range(self._table.queue.top):
                entry = entries[i]
                if entry.worker == self._worker and entry.state in (WAITING, GRANTED):
                    row = self._breakers.row_of_tag(entry.backend)
                    if row is not None:
                        if entry.state == WAITING:
                            row.queued -= 1
                        else:
                            row.reserved -= 1
                    entry.state = FREE

    # ------------------------------------------------------------------ capacity

    def capacity(self, backend: str) -> int | None:
        """Requests ``backend`` serves at once, None when not known (no queue). A dict lookup when configured."""
        if not self.settings.enabled:
            return None
        configured = self._configured.get(backend)
        if configured is not None:
            return configured
        row = self._breakers.row(backend)
        if row is not None and row.slots_total > 0:
            return int(row.slots_total)
        kind = self._kind_of(backend)
        return KNOWN_CAPACITY.get(kind) if kind is not None else None

    def has_room(self, backend: str) -> bool:
        """Would a request to ``backend`` go in without queuing? (Read without the lock: a hint for choosing.)"""
        capacity = self.capacity(backend)
        if capacity is None:
            return True
        row = self._breakers.row(backend)
        return row is None or (not row.queued and row.inflight_sum + row.reserved < capacity)

    # ------------------------------------------------------------------ entering

    def enter(self, backend: str, model: str | None) -> float | None:
        """``Breakers.begin`` for one attempt when ``backend`` has room (or no known capacity): its share-clock
        mark. None when the attempt must wait its turn (``wait_turn``). No await: the common case stays cheap."""
        capacity = self.capacity(backend)
        if capacity is None:
            return self._breakers.begin(backend, model)
        return self._breakers.try_begin(backend, model, capacity)

    async def wait_turn(self, backend: str, model: str | None, key_id: str, weight: float | None,
                        wait_s: float | None = None) -> tuple[float, float]:
        """Wait in the queue for ``backend`` (after ``enter`` said None), then ``Breakers.begin``. Returns the
        share-clock mark and the seconds waited.

        ``wait_s``: the longest wait (default ``queue_timeout_ms``); past it, 429 backend_overloaded. A cancelled
        waiter (its client left) leaves the queue at once.
        """
        capacity = self.capacity(backend)
        if capacity is None:  # switched off since enter
            return self._breakers.begin(backend, model), 0.0
        limit = self.settings.queue_timeout_ms / 1000
        limit = limit if wait_s is None else min(limit, wait_s)
        place = self._enqueue(backend, key_id, weight or self.settings.default_weight, capacity)
        try:
            mark = await self._wait(place, model, capacity, limit)
        except BaseException:
            self._leave(place)
            raise
        return mark, self._clock() - place.since

    async def begin(self, backend: str, model: str | None, key_id: str, weight: float | None,
                    wait_s: float | None = None) -> tuple[float, float | None]:
        """``enter``, else ``wait_turn``: the mark and the seconds waited (None: not queued)."""
        mark = self.enter(backend, model)
        if mark is not None:
            return mark, None
        return await self.wait_turn(backend, model, key_id, weight, wait_s)

    def _tag(self, backend: str) -> int:
        tag = self._tags.get(backend)
        if tag is None:
            tag = self._tags[backend] = tag_of(backend)
        return tag

    def _enqueue(self, backend: str, key_id: str, weight: float, capacity: int) -> Place:
        """Take a place: the start tag follows the key's last finish tag on this backend (429 when the queue is
        full)."""
        btag, ktag = self._tag(backend), tag_of(key_id)
        queue = self._table.queue
        entries = queue.entries
        now = self._clock()
        row = self._breakers.row(backend)  # before the lock: a first lookup takes it
        with self._breakers.lock:
            vtime = row.vtime
            last_finish = vtime
            free = kept = -1
            for i in range(queue.top):
                entry = entries[i]
                state = entry.state
                if state == FREE:
                    free = i if free < 0 else free
                    continue
                if entry.backend != btag:
                    if state == KEPT:
                        kept = i if kept < 0 else kept
                    continue
                if state == KEPT and entry.finish <= vtime:
                    entry.state = FREE  # the virtual time passed it: it no longer holds the key back
                    free = i if free < 0 else free
                    continue
                if entry.key == ktag:
                    last_finish = max(last_finish, entry.finish)
                    if state == KEPT:
                        entry.state = FREE  # the new entry carries the key's finish tag from now on
                        free = i if free < 0 else free
            if free < 0 and queue.top < QUEUE_SLOTS:
                free = queue.top
                queue.top += 1
            if free < 0:
                free = kept  # full: forget another backend's kept finish tag before refusing anyone
            if free < 0:
                raise self._overloaded(backend, row, capacity, "its queue is full", row.queued + 1)
            entry = entries[free]
            entry.state, entry.worker, entry.backend, entry.key = WAITING, self._worker, btag, ktag
            entry.start = last_finish
            entry.finish = last_finish + 1 / weight
            entry.seq = row.arrivals
            entry.since = now
            entry.key_id = key_id.encode()[:KEY_CHARS]
            row.arrivals += 1
            row.queued += 1
            self._grant(row, btag, capacity)
        return Place(free, backend, now)

    async def _wait(self, place: Place, model: str | None, capacity: int, limit_s: float) -> float:
        entry = self._table.queue.entries[place.index]
        row = self._breakers.row(place.backend)
        deadline = place.since + limit_s
        while True:
            if entry.state == GRANTED:  # a read of our own entry: whoever freed a place may have granted it
                with self._breakers.lock:
                    if entry.state == GRANTED:
                        entry.state = KEPT
                        row.reserved -= 1
                        return self._breakers.begin_locked(place.backend, model)
            if self._clock() >= deadline:
                raise self._overloaded(place.backend, row, capacity,
                                       f"this request waited {limit_s * 1000:.0f} ms in the appliance's queue",
                                       max(row.queued, 1))
            capacity = self.capacity(place.backend) or 0  # a reload may change it, or switch admission off
            if not capacity:
                with self._breakers.lock:
                    if entry.state == WAITING:  # no queue any more: in at once, as any request now
                        entry.state = FREE
                        row.queued -= 1
                        return self._breakers.begin_locked(place.backend, model)
                continue  # granted meanwhile
            if row.inflight_sum + row.reserved < capacity:  # room nobody granted (a lost wake-up, a new capacity)
                with self._breakers.lock:
                    self._grant(row, self._tag(place.backend), capacity)
            await self._sleep(POLL_S)

    def _leave(self, place: Place) -> None:
        """A waiter gave up (deadline, client gone): its place frees, a granted one passes to the next."""
        entry = self._table.queue.entries[place.index]
        row = self._breakers.row(place.backend)
        capacity = self.capacity(place.backend)
        with self._breakers.lock:
            if entry.state == WAITING:
                row.queued -= 1
            elif entry.state == GRANTED:
                row.reserved -= 1
            else:
                return
            entry.state = FREE
            if capacity:
                self._grant(row, self._tag(place.backend), capacity)

    # ------------------------------------------------------------------ letting in

    def released(self, backend: str) -> None:
        """A request on ``backend`` ended (after ``Breakers.end``): let the next waiters in. A read when none wait."""
        row = self._breakers.row(backend)
        if row is None or not row.queued:
            return
        capacity = self.capacity(backend)  # None: admission is off now; the waiters let themselves in
        if capacity:
            with self._breakers.lock:
                self._grant(row, self._tag(backend), capacity)

    def _grant(self, row: Any, btag: int, capacity: int) -> None:
        """Let waiters in, lowest start tag first, while the backend has room. Under the lock."""
        room = capacity - row.inflight_sum - row.reserved
        if room <= 0 or not row.queued:
            return
        entries = self._table.queue.entries
        waiting = []
        for i in range(self._table.queue.top):
            entry = entries[i]
            if entry.state == WAITING and entry.backend == btag:
                waiting.append((entry.start, entry.seq, i))
        waiting.sort()
        for start, _, i in waiting[:room]:
            entries[i].state = GRANTED
            row.queued -= 1
            row.reserved += 1
            row.vtime = max(row.vtime, start)

    # ------------------------------------------------------------------ reading

    def waiting(self, backend: str) -> dict[str, int]:
        """Requests waiting for ``backend`` per key id (for /statsz)."""
        btag = self._tag(backend)
        entries = self._table.queue.entries
        out: dict[str, int] = {}
        with self._breakers.lock:
            for i in range(self._table.queue.top):
                entry = entries[i]
                if entry.state == WAITING and entry.backend == btag:
                    key = entry.key_id.decode(errors="replace")
                    out[key] = out.get(key, 0) + 1
        return out

    def _overloaded(self, backend: str, row: Any, capacity: int, why: str, waiting: int) -> GatewayError:
        """429 backend_overloaded, Retry-After from how fast the backend drains: the ``waiting`` requests (this one
        among them), one per mean gap between two ends (1 s before any was measured)."""
        wait = max(1.0, waiting * (row.finish_gap_s or 1.0))
        return GatewayError("backend_overloaded", f"Backend {backend!r} is at capacity ({capacity} in flight) and "
                            f"{why}; try again in {wait:.0f} s.", status=429, type="rate_limit_error",
                            headers=retry_after_headers(wait))
