"""One worker's gateway: its backends, their catalog, its database buffers, and the refresh loop.

Built in before_server_start, hung on app.ctx, passed explicitly to the pipeline. No globals.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from appliance.accounts.auth import Authenticator
from appliance.accounts.limits import Limiter, ModelScopes
from appliance.accounts.live_limits import RedisLimiter
from appliance.accounts.usage import ComputeRates, Prices
from appliance.common.config import BackendSettings, Settings
from appliance.common.errors import GatewayError
from appliance.core import discovery
from appliance.core.admission import FairQueue, QueueTable
from appliance.core.cache import ResponseCache
from appliance.core.catalog import Catalog, Plan
from appliance.core.embeddings import Embedder
from appliance.core.resilience import Breakers
from appliance.core.router import Router
from appliance.core.routing import Selector, Target
from appliance.core.shared_breakers import BreakerSync
from appliance.core.stored_responses import StoredResponses
from appliance.core.templates import Library
from appliance.core.vision import Describer
from appliance.guardrails.moderation import Moderator
from appliance.observe.accesslog import AccessLog
from appliance.observe.metrics import Recorder
from appliance.providers import registry
from appliance.providers.base import ModelInfo, Provider
from appliance.providers.transport import Limits, Transport
from appliance.storage import requests_repo, stats_repo
from appliance.storage.db import Database
from appliance.storage.state import SharedState
from appliance.storage.writer import BufferedWriter

log = logging.getLogger("appliance.core.gateway")

# How long a request waits for the first discovery when it arrives right after start.
FIRST_DISCOVERY_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class Upstreams:
    """The backends of one config generation: their providers and settings, replaced whole by a reload, so
    a request that started before it keeps the ones it started with (see exchange.upstreams)."""

    providers: dict[str, Provider] = field(default_factory=dict)
    backends: dict[str, BackendSettings] = field(default_factory=dict)

    def limits_for(self, backend: str, timeout_s: float | None) -> Limits | None:
        """The backend's timeouts, the total capped at ``timeout_s`` (None: the backend's own)."""
        if timeout_s is None:
            return None
        settings = self.backends[backend]
        return Limits(min(settings.timeout_s, timeout_s), settings.connect_timeout_s)


def _same_upstream(old: BackendSettings | None, new: BackendSettings) -> bool:
    """The same backend for its provider: a reload that changes only its cost_per_hour (which the provider never
    reads; gw.compute has it) or its max_concurrency (gw.admission's) keeps the provider and its health."""
    return old is not None and (old == new or old.model_copy(
        update={"cost_per_hour": new.cost_per_hour, "max_concurrency": new.max_concurrency}) == new)


@dataclass
class Gateway:
    settings: Settings
    transport: Transport
    db: Database
    writer: BufferedWriter
    authenticator: Authenticator
    limiter: Limiter | RedisLimiter  # RedisLimiter when [state] url is set
    breakers: Breakers
    cache: ResponseCache
    queue: QueueTable | None = None  # the fair admission queue all workers share (None: this process's own)
    state: SharedState | None = None  # [state] url: the live state several appliances share (None: this host's)
    breaker_sync: BreakerSync | None = None  # with state: the breakers and load shared with the other nodes
    catalog: Catalog = field(init=False)
    prices: Prices = field(init=False)
    compute: ComputeRates = field(init=False)  # beside prices: what a backend's busy seconds cost
    model_scopes: ModelScopes = field(init=False)
    admission: FairQueue = field(init=False)
    responses: StoredResponses = field(init=False)  # in the database, or in the shared state
    selector: Selector = field(default_factory=Selector, init=False)
    rng: random.Random = field(default_factory=random.Random, init=False)  # retry jitter
    upstreams: Upstreams = field(default_factory=Upstreams, init=False)
    draining: bool = field(default=False, init=False)
    metrics: Recorder = field(init=False)
    embedder: Embedder = field(init=False)
    describer: Describer = field(init=False)
    router: Router = field(init=False)
    templates: Library = field(init=False)
    moderator: Moderator = field(init=False)  # [guardrails.content_moderation] categories, compiled
    access_log: AccessLog | None = field(default=None, init=False)
    _discovered: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.settings.models)
        self.responses = StoredResponses(self.db, self.state)
        self._derive()
        for backend in self.settings.backends:
            self._add(backend, kind=backend.type)
        self.admission = FairQueue(self.queue or QueueTable(shared=False), self.breakers, self.settings.admission,
                                   self.upstreams.backends, self._kind_of, getattr(self.breakers, "worker", 0))

    def _kind_of(self, backend: str) -> str | None:
        state = self.catalog.backends.get(backend)  # whichever catalog is current
        return state.kind if state is not None else None

    def _derive(self) -> None:
        """What follows from the settings alone (at start and on each reload)."""
        self.prices = Prices(self.settings.models)
        self.compute = ComputeRates(self.settings.backends)
        self.model_scopes = ModelScopes(self.settings.models, first_slot=self.settings.limits.key_slots)
        self.metrics = Recorder(per_key=self.settings.metrics.per_key, known_model=self._knows)
        self.access_log = AccessLog(self.settings.log.access) if self.settings.log.access != "off" else None
        # New with every config: the embedding model's routes may have changed, and with them its vectors.
        self.embedder = Embedder(self.settings.embeddings, self._embedding_backends)
        self.router = Router(self.settings.router, self.embedder)
        # New with every config too: descriptions already made stay in the shared table (keyed by describer).
        self.describer = Describer(self.settings.vision, self._embedding_backends, self.db, self.writer)
        self.templates = Library(self.db, self.settings.templates)  # anew: a reload may change its bounds
        self.moderator = Moderator(self.settings.guardrails.content_moderation.categories)

    def _embedding_backends(self) -> tuple[Catalog, dict[str, Provider]]:  # the embedder's and the describer's
        return self.catalog, self.providers  # whichever generation is current

    def _knows(self, model: str) -> bool:
        return self.catalog.knows(model)  # whichever catalog is current

    @property
    def providers(self) -> dict[str, Provider]:
        return self.upstreams.providers

    @property
    def zero_config(self) -> bool:
        return not self.settings.backends and self.settings.discovery.enabled

    def _add(self, backend: BackendSettings, kind: str) -> None:
        self.upstreams.backends[backend.name] = backend
        self.upstreams.providers[backend.name] = registry.build(backend, self.transport, kind)
        self._list(self.catalog, backend, kind)

    @staticmethod
    def _list(catalog: Catalog, backend: BackendSettings, kind: str) -> None:
        catalog.add_backend(backend.name, kind)
        if not backend.discover and backend.models:
            catalog.update(backend.name, models=[ModelInfo(id=m) for m in backend.models])
            catalog.backends[backend.name].up = None  # listed from config; not probed yet

    def order(self, plan: Plan, targets: list[Target], *, peek: bool = False) -> list[Target]:
        """The plan's ``targets`` in the order its alias's strategy tries them, the pick first.

        ``peek``: the order the next request would get, without moving the strategy on (/v1/providers).
        """
        alias = plan.alias
        if alias is None:
            return targets
        return self.selector.order(plan.name, targets, alias.strategy, alias.weights, busy=self._busy, peek=peek)

    def _busy(self, target: Target) -> float:
        return self.breakers.busy(target.backend, target.model)

    # ------------------------------------------------------------------ reload

    def reconfigure(self, settings: Settings) -> None:
        """Take a reloaded config (its restart-only values as they run: see core/reload.py).

        Everything derived is built aside, then swapped in with no await in between: a request sees the old
        generation or the new one, never half of each, and one in flight keeps its Upstreams. A backend whose
        settings did not change keeps its provider and its catalog entry (health, models) as they are.
        """
        old = self.upstreams
        catalog = Catalog(settings.models)
        upstreams = Upstreams()
        configured = list(settings.backends)
        if not configured and settings.discovery.enabled:  # zero-config: what discovery found stays
            listed = {b.name for b in self.settings.backends}
            configured = [b for name, b in old.backends.items() if name not in listed]
        for backend in configured:
            kept = _same_upstream(old.backends.get(backend.name), backend) and backend.name in self.catalog.backends
            kind = old.providers[backend.name].kind if kept else backend.type
            upstreams.backends[backend.name] = backend
            upstreams.providers[backend.name] = (old.providers[backend.name] if kept
                                                 else registry.build(backend, self.transport, kind))
            if kept:
                catalog.adopt(self.catalog.backends[backend.name])
            else:
                self._list(catalog, backend, kind)
        self.settings, self.upstreams, self.catalog = settings, upstreams, catalog
        self._derive()
        self.cache.reconfigure(settings.cache)
        self.breakers.reconfigure(settings.routing)
        self.admission.reconfigure(settings.admission, upstreams.backends)
        added = [name for name in upstreams.providers if upstreams.providers[name] is not old.providers.get(name)]
        if added:  # new or changed backends: probe them now rather than at the next interval
            asyncio.get_running_loop().create_task(self._probe_all(added), name="probe-reloaded")

    async def _probe_all(self, names: list[str]) -> None:
        await asyncio.gather(*(self._probe(name) for name in names))

    # ------------------------------------------------------------------ discovery

    async def refresh(self, *, scan: bool = True) -> None:
        """Find new local servers (zero-config), then probe every backend and list its models."""
        if scan and self.zero_config:
            await self._scan()
        await asyncio.gather(*(self._probe(name) for name in list(self.providers)))
        self._discovered.set()
        if self._wants_load:
            await asyncio.gather(*(self._sample_load(name) for name in list(self.providers)))

    @property
    def _wants_load(self) -> bool:
        # least_busy ranks by it; fair admission learns a llama.cpp server's capacity from its /slots.
        return self.settings.admission.enabled or any(m.strategy == "least_busy" for m in self.settings.models)

    async def _sample_load(self, name: str) -> None:
        try:
            load = await self.providers[name].load()
        except GatewayError:
            return
        if load is not None:
            self.breakers.set_load(name, load)

    async def _scan(self) -> None:
        cfg = self.settings.discovery
        known_urls = {b.url.removesuffix("/v1") for b in self.upstreams.backends.values()}
        for port, kind in (await discovery.scan(self.transport, cfg.host, cfg.ports)).items():
            backend = discovery.backend_for(kind, cfg.host, port, set(self.upstreams.backends))
            if backend.url.removesuffix("/v1") in known_urls:
                continue
            self._add(backend, kind)
            log.info("found %s at %s: registered as backend %r", kind, backend.url, backend.name)

    async def _probe(self, name: str) -> None:
        upstreams = self.upstreams
        provider, backend = upstreams.providers[name], upstreams.backends[name]
        try:
            models = await provider.list_models()
        except GatewayError as exc:
            if self.upstreams.providers.get(name) is not provider:
                return  # reloaded meanwhile, and this backend with it
            if self.catalog.backends[name].up is not False:
                log.warning("backend %r is not answering: %s", name, exc.message)
            self.catalog.update(name, models=None, error=exc.message)
            self.breakers.set_probe(name, up=False)
            return
        if self.upstreams.providers.get(name) is not provider:
            return  # reloaded meanwhile, and this backend with it
        if not backend.discover:
            models = [ModelInfo(id=m) for m in backend.models] if backend.models else models
        state = self.catalog.backends[name]
        if state.up is not True:
            log.info("backend %r (%s) is up with %d model(s)", name, provider.kind, len(models))
        state.kind = provider.kind
        self.catalog.update(name, models=models)
        self.breakers.set_probe(name, up=True)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop(), name="backend-refresh")

    async def _refresh_loop(self) -> None:
        """Probe every backend each routing.probe_interval_s; look for new ones each discovery.interval_s."""
        interval = min(self.settings.routing.probe_interval_s, self.settings.discovery.interval_s)
        last_scan = float("-inf")
        while True:
            now = asyncio.get_running_loop().time()
            scan = now - last_scan >= self.settings.discovery.interval_s
            try:
                await self.refresh(scan=scan)
                if scan:
                    await self.sweep(time.time())
            except Exception:  # never let one bad probe (or a busy database) end the loop
                log.exception("backend refresh failed")
            if scan:
                last_scan = now
            await asyncio.sleep(interval)

    async def sweep(self, now: float) -> None:
        """Drop stored Responses past responses.keep_days and request-log rows past log.keep_days.

        Every worker sweeps on its own loop: deleting what is already gone is harmless.
        """
        await self.responses.sweep(now)
        cutoff = now - self.settings.log.keep_days * 86400
        await requests_repo.sweep(self.db, cutoff)
        await stats_repo.sweep_traffic(self.db, cutoff)

    async def wait_discovered(self) -> None:
        """Let a request that arrives in the first moments of a worker's life see the catalog."""
        if not self._discovered.is_set():
            try:
                await asyncio.wait_for(self._discovered.wait(), FIRST_DISCOVERY_WAIT_S)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        await self.cache.stop()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.writer.stop()
        if isinstance(self.limiter, RedisLimiter):
            await self.limiter.close()  # its queued settles go out, its places in flight are given back
        if self.breaker_sync is not None:
            await self.breaker_sync.stop()
        if self.state is not None:
            await self.state.close()

    def degraded(self) -> list[str]:
        """What works less well than it should while answers still flow."""
        found = ["database writes failing"] if self.writer.failing_since is not None else []
        if self.state is not None and self.state.unreachable:
            found.append(f"shared state unreachable (on_state_error={self.state.settings.on_state_error})")
        return found

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        answered = [s.name for s in self.catalog.backends.values() if s.up]
        if answered:
            return True, "ok"
        if not self.catalog.backends:
            return False, "no backend configured or discovered"
        return False, "no backend answered its last probe"
