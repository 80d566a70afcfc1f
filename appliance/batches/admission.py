"""When a batch line may go to a backend: only while interactive traffic leaves it room.

A line is dispatched to a backend only when all of these hold:
- the runner's own lines in flight there are below the backend's batch cap (``batches.backend_concurrency``,
  else ``batches.max_concurrency``, else by kind: vLLM 4, llama.cpp its slots - 1, anything else 1);
- the backend's own queue is empty, where it reports one (vLLM's waiting requests, llama.cpp's deferred
  ones; samples older than 3 s are ignored);
- no request waits for the backend in the fair admission queue (core/admission.py);
- interactive requests in flight (all workers, from the shared in-flight counters) plus the batch lines
  leave room within the backend's capacity: its admission capacity (``max_concurrency``, or learned) or
  slot count where known, else cap + ``batches.reserve``;
  single-slot servers (Ollama, llama-cpp-python) get the batch line only while nothing else runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from appliance.common.config import BatchesSettings
from appliance.common.errors import GatewayError
from appliance.core.gateway import Gateway
from appliance.providers.load import Load

_DEFAULT_CAP = {"vllm": 4, "ollama": 1, "llama-cpp-python": 1}
_SINGLE_SLOT = frozenset(("ollama", "llama-cpp-python"))
_STALE_S = 3.0
_SAMPLE_EVERY_S = 1.0
_SAMPLE_TIMEOUT_S = 2.0


class Admission:
    def __init__(self, gw: Gateway, settings: BatchesSettings, clock: Callable[[], float] = time.time) -> None:
        self._gw = gw
        self._settings = settings
        self._clock = clock
        self._mine: dict[str | None, int] = {}
        self._loads: dict[str, Load] = {}
        self._sampling: dict[str, asyncio.Task[None]] = {}
        self._sampled_at: dict[str, float] = {}

    def backend_of(self, model: str | None) -> str | None:
        """The backend a batch's lines go to first (None when no backend serves the model any more)."""
        if model is None:
            return None
        try:
            return self._gw.catalog.plan(model).routes[0].backend
        except GatewayError:
            return None

    def started(self, backend: str | None) -> None:
        self._mine[backend] = self._mine.get(backend, 0) + 1

    def ended(self, backend: str | None) -> None:
        self._mine[backend] = max(0, self._mine.get(backend, 0) - 1)

    def in_flight(self, backend: str | None) -> int:
        return self._mine.get(backend, 0)

    def cap(self, backend: str) -> int:
        settings = self._settings
        if backend in settings.backend_concurrency:
            return settings.backend_concurrency[backend]
        if settings.max_concurrency is not None:
            return settings.max_concurrency
        kind = self._kind(backend)
        if kind == "llamacpp":
            load = self._fresh(backend)
            return max(1, (load.slots_total or 2) - 1) if load is not None else 1
        return _DEFAULT_CAP.get(kind, 1)

    def room(self, backend: str | None) -> int:
        """How many more lines may start on ``backend`` now (a line whose model no backend serves: 1, so
        it fails with the pipeline's own error instead of waiting forever)."""
        if backend is None:
            return max(0, 1 - self.in_flight(None))
        self._maybe_sample(backend)
        cap = self.cap(backend)
        mine = self.in_flight(backend)
        if mine >= cap:
            return 0
        load = self._fresh(backend)
        if load is not None and load.queue_waiting > 0:
            return 0
        row = self._gw.breakers.row(backend)
        if row is not None and row.queued:
            return 0  # requests wait for this backend in the fair admission queue: they go first
        interactive = max(0, self._gw.breakers.in_flight(backend) - mine)
        known = self._gw.admission.capacity(backend)
        if known is not None:
            capacity = known
        elif load is not None and load.slots_total:
            capacity = load.slots_total
        elif self._kind(backend) in _SINGLE_SLOT and backend not in self._settings.backend_concurrency:
            capacity = cap
        else:
            capacity = cap + self._settings.reserve
        return max(0, min(cap - mine, capacity - interactive - mine))

    def _kind(self, backend: str) -> str:
        state = self._gw.catalog.backends.get(backend)
        return state.kind if state is not None else "openai"

    def _fresh(self, backend: str) -> Load | None:
        load = self._loads.get(backend)
        if load is None or load.sampled_at is None or self._clock() - load.sampled_at > _STALE_S:
            return None
        return load

    def _maybe_sample(self, backend: str) -> None:
        """Refresh the backend's own load signal in the background, at most once a second."""
        now = self._clock()
        if now - self._sampled_at.get(backend, float("-inf")) < _SAMPLE_EVERY_S or backend in self._sampling:
            return
        provider = self._gw.providers.get(backend)
        if provider is None:
            return
        self._sampled_at[backend] = now

        async def sample() -> None:
            try:
                with contextlib.suppress(GatewayError, TimeoutError):
                    load = await asyncio.wait_for(provider.load(), _SAMPLE_TIMEOUT_S)
                    if load is not None:
                        self._loads[backend] = Load(load.queue_waiting, load.running, load.slots_idle,
                                                    load.slots_total, self._clock())
            finally:
                self._sampling.pop(backend, None)

        self._sampling[backend] = asyncio.get_running_loop().create_task(sample(), name=f"batch-load-{backend}")

    async def sample(self) -> None:
        """Wait for the samples under way (housekeeping; keeps no task dangling)."""
        for task in list(self._sampling.values()):
            with contextlib.suppress(Exception):
                await task
