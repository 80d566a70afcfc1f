"""Prometheus metrics, correct across workers (prometheus-client multiprocess mode).

The main process points ``PROMETHEUS_MULTIPROC_DIR`` at a folder of its own before anything imports
prometheus_client (observe/metricsdir.py): the client picks its value class at import. Every worker
then writes its samples to mmap'd files there, and ``/metrics`` merges them into a fresh registry per
scrape. A worker that stops, or that the watchdog found dead, is marked dead so its live gauges go.

Labels are bounded: ``model`` is a configured or listed name (else "other"), ``endpoint`` a known path
(else "other"), ``backend`` a configured or discovered one; key labels only with ``[metrics] per_key``.
Live values that every worker must report alike (backend up, breaker state) are read at scrape time
from the shared backend table (``LiveCollector``), not from per-worker gauges.

The metric objects are the only module-level state the house allows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from appliance import __version__
from appliance.common.paths import PROXY

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER = "other"
NONE = "none"

# Paths that get their own endpoint label (each route the pipeline serves); anything else counts as "other",
# and every /proxy/{backend}/{path} call as "proxy" (the backend label tells them apart; paths are the client's).
ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
                       "/v1/messages/count_tokens", "/v1/responses", "/v1/rerank", "/rerank", "/v1/score",
                       "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/audio/transcriptions",
                       "/v1/audio/translations", "/v1/audio/speech", "/v1/router"))
PROXY_LABEL = "proxy"
_RESPONSE_ITEM = re.compile(r"/v1/responses/[^/]+(/input_items)?")

# Seconds. LLM answers run from milliseconds (a cache hit) to minutes (a long local generation).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_REQUEST_LABELS = ("endpoint", "model", "backend", "status_class", "cache")
_TOKEN_LABELS = ("model", "backend", "type")
_KEY_LABELS = ("key_id", "key_name")

# registry=None: nothing registers globally; each scrape builds its own registry (multiprocess mode
# reads the files; without it, ``render`` registers the objects chosen for this configuration).
REQUESTS = Counter("appliance_requests", "Requests answered, by outcome.", _REQUEST_LABELS, registry=None)
REQUESTS_BY_KEY = Counter("appliance_requests", "Requests answered, by outcome.", _REQUEST_LABELS + _KEY_LABELS,
                          registry=None)
TOKENS = Counter("appliance_tokens", "Tokens processed (type: prompt or completion).", _TOKEN_LABELS,
                 registry=None)
TOKENS_BY_KEY = Counter("appliance_tokens", "Tokens processed (type: prompt or completion).",
                        _TOKEN_LABELS + _KEY_LABELS, registry=None)
COST = Counter("appliance_cost_usd", "Cost of the answered requests, in USD.", ("model",), registry=None)
COST_BY_KEY = Counter("appliance_cost_usd", "Cost of the answered requests, in USD.", ("model", *_KEY_LABELS),
                      registry=None)
COMPUTE_COST = Counter("appliance_compute_cost_usd", "Compute cost charged to requests: their share of the "
                       "busy seconds of backends with a cost_per_hour, in USD.", ("backend",), registry=None)
ADMISSION_WAIT_SECONDS = Histogram("appliance_admission_wait_seconds", "Time requests waited in the fair admission "
                                   "queue for a backend at capacity (only those that waited).", ("backend",),
                                   buckets=LATENCY_BUCKETS, registry=None)
ADMITTED = Counter("appliance_admission_admitted", "Requests let in from the fair admission queue.", ("backend",),
                   registry=None)
ADMITTED_BY_KEY = Counter("appliance_admission_admitted", "Requests let in from the fair admission queue.",
                          ("backend", *_KEY_LABELS), registry=None)
REQUEST_SECONDS = Histogram("appliance_request_duration_seconds", "Time from request to the last byte sent.",
                            ("endpoint", "backend"), buckets=LATENCY_BUCKETS, registry=None)
UPSTREAM_SECONDS = Histogram("appliance_upstream_duration_seconds", "Time spent waiting on the backend.",
                             ("backend",), buckets=LATENCY_BUCKETS, registry=None)
OVERHEAD_SECONDS = Histogram("appliance_overhead_seconds", "Time the gateway itself added to a request.",
                             buckets=OVERHEAD_BUCKETS, registry=None)
TTFT_SECONDS = Histogram("appliance_time_to_first_token_seconds", "Time to the first streamed token.",
                         ("model", "backend"), buckets=LATENCY_BUCKETS, registry=None)
INFLIGHT = Gauge("appliance_inflight_requests", "Requests being served now, all workers.",
                 multiprocess_mode="livesum", registry=None)
RETRIES = Counter("appliance_retries", "Retries of a backend attempt.", registry=None)
FALLBACKS = Counter("appliance_fallbacks", "Requests answered by a target after another one failed.",
                    registry=None)
RATELIMIT_REJECTIONS = Counter("appliance_ratelimit_rejections", "Requests refused by the gateway's own limits.",
                               ("limit",), registry=None)
WRITE_QUEUE = Gauge("appliance_db_write_queue_depth", "Rows buffered for the database, all workers (sampled at "
                    "each flush).", multiprocess_mode="livesum", registry=None)
DB_WRITE_FAILURES = Counter("appliance_db_write_failures", "Database writes that failed (full disk, read-only "
                            "folder); the rows wait in memory and the journal.", registry=None)
EMBEDDED_TEXTS = Counter("appliance_embedded_texts", "Texts the router and the semantic cache embedded (purpose: "
                         "router or cache), by where the vector came from (source: memory or backend).",
                         ("purpose", "source"), registry=None)
EMBEDDING_FAILURES = Counter("appliance_embedding_failures", "Embedding calls that failed (purpose: router or "
                             "cache).", ("purpose",), registry=None)
DESCRIBED_IMAGES = Counter("appliance_described_images", "Images described for models without vision, by where the "
                           "description came from (source: memory, table or describer).", ("source",), registry=None)
GUARDRAILS = Counter("appliance_guardrail", "Guardrail checks, by outcome (passed, redacted, blocked, failed).",
                     ("guardrail", "outcome"), registry=None)
STREAM_FAILOVERS = Counter("appliance_stream_failovers", "Streams whose backend failed after the first token and "
                           "that went on on another target.", ("from_backend", "to_backend"), registry=None)
STATE_ERRORS = Counter("appliance_state_errors", "Calls to the shared state (Redis, [state] url) that failed; "
                       "each outage's requests then follow on_state_error.", ("error",), registry=None)
WORKERS = Gauge("appliance_workers", "Worker processes serving.", multiprocess_mode="livesum", registry=None)
BUILD_INFO = Gauge("appliance_build_info", "The running version (value 1).", ("version",),
                   multiprocess_mode="livemax", registry=None)

_COMMON = (INFLIGHT, RETRIES, FALLBACKS, RATELIMIT_REJECTIONS, WRITE_QUEUE, DB_WRITE_FAILURES, STATE_ERRORS, WORKERS,
           BUILD_INFO,
           REQUEST_SECONDS, UPSTREAM_SECONDS, OVERHEAD_SECONDS, TTFT_SECONDS, EMBEDDED_TEXTS, EMBEDDING_FAILURES,
           DESCRIBED_IMAGES, COMPUTE_COST, GUARDRAILS, STREAM_FAILOVERS, ADMISSION_WAIT_SECONDS)


# ------------------------------------------------------------------------------------------ the folder


def process_dead(pid: int) -> None:
    """A worker stopped or died: its live gauges (in flight, queue depth, workers) no longer count."""
    if os.environ.get(ENV):
        _multiprocess.mark_process_dead(pid)


def worker_started() -> None:
    WORKERS.inc()
    BUILD_INFO.labels(__version__).set(1)


# ------------------------------------------------------------------------------------------ scraping


class LiveCollector:
    """Values read at scrape time from what every worker shares, so any worker answers the same."""

    def __init__(self, backends: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        self._backends = backends  # (name, Breakers.state(name)) pairs

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("appliance_backend_up", "1 when the backend answered its last probe (any worker), "
                               "0 when it did not; absent before the first probe.", labels=("backend",))
        circuit = GaugeMetricFamily("appliance_circuit_state", "The backend's circuit breaker: 0 closed, 1 open, "
                                    "2 half-open.", labels=("backend",))
        busy = CounterMetricFamily("appliance_backend_busy_seconds", "Seconds the backend had at least one "
                                   "request in flight from the appliance (all workers), since it started.",
                                   labels=("backend",))
        queued = GaugeMetricFamily("appliance_admission_queue_depth", "Requests waiting in the fair admission "
                                   "queue for the backend (all workers).", labels=("backend",))
        for name, state in self._backends():
            if state.get("up") is not None:
                up.add_metric((name,), 1.0 if state["up"] else 0.0)
            circuit.add_metric((name,), float(_CIRCUIT.get(state["state"], 0)))
            busy.add_metric((name,), float(state.get("busy_s", 0.0)))
            queued.add_metric((name,), float(state.get("queued", 0)))
        yield up
        yield circuit
        yield busy
        yield queued


_CIRCUIT = {"closed": 0, "open": 1, "half_open": 2}


def render(live: LiveCollector, per_key: bool) -> bytes:
    """The exposition for one scrape: every worker's samples plus the live values."""
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(ENV):
        _multiprocess.MultiProcessCollector(registry)
    else:  # one process, no folder (in-process use): this process's own objects
        chosen = (REQUESTS_BY_KEY, TOKENS_BY_KEY, COST_BY_KEY, ADMITTED_BY_KEY) if per_key else (
            REQUESTS, TOKENS, COST, ADMITTED)
        for metric in (*chosen, *_COMMON):
            registry.register(metric)
    registry.register(live)
    return generate_latest(registry)


# ------------------------------------------------------------------------------------------ recording


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith(PROXY):
        return PROXY_LABEL
    if _RESPONSE_ITEM.fullmatch(path):
        return "/v1/responses/{id}"
    return OTHER


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


class Recorder:
    """One worker's handle on the request metrics: picks the label set once, caches labelled children.

    ``known_model`` tells whether a model name is configured or listed (else it is counted as "other",
    so random names from clients create no series).
    """

    def __init__(self, *, per_key: bool, known_model: Callable[[str], bool]) -> None:
        self.per_key = per_key
        self._known_model = known_model
        self._requests = REQUESTS_BY_KEY if per_key else REQUESTS
        self._tokens = TOKENS_BY_KEY if per_key else TOKENS
        self._cost = COST_BY_KEY if per_key else COST
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, model: str | None, route_name: str | None) -> str:
        if route_name is not None:  # an alias from the config (patterns included): bounded by the config
            return route_name
        if model is not None and self._known_model(model):
            return model
        return OTHER

    @staticmethod
    def request_started() -> None:
        INFLIGHT.inc()

    @staticmethod
    def request_ended() -> None:
        INFLIGHT.dec()

    def request_finished(self, *, endpoint: str, model: str, backend: str | None, status: int, cache: str | None,
                         key: tuple[str, str] | None, latency_s: float, overhead_s: float | None,
                         ttft_s: float | None, prompt_tokens: int, completion_tokens: int, cost_usd: float,
                         retries: int, fell_back: bool, compute_cost_usd: float | None = None) -> None:
        backend = backend or NONE
        keys = (key or (NONE, NONE)) if self.per_key else ()
        labels = (endpoint, model, backend, status_class(status), cache.lower() if cache else NONE, *keys)
        self._child(self._requests, labels).inc()
        self._child(REQUEST_SECONDS, (endpoint, backend)).observe(latency_s)
        if overhead_s is not None:
            OVERHEAD_SECONDS.observe(max(overhead_s, 0.0))
            self._child(UPSTREAM_SECONDS, (backend,)).observe(max(latency_s - overhead_s, 0.0))
        if ttft_s is not None:
            self._child(TTFT_SECONDS, (model, backend)).observe(ttft_s)
        if prompt_tokens:
            self._child(self._tokens, (model, backend, "prompt", *keys)).inc(prompt_tokens)
        if completion_tokens:
            self._child(self._tokens, (model, backend, "completion", *keys)).inc(completion_tokens)
        if cost_usd:
            self._child(self._cost, (model, *keys)).inc(cost_usd)
        if compute_cost_usd:
            self._child(COMPUTE_COST, (backend,)).inc(compute_cost_usd)
        if retries:
            RETRIES.inc(retries)
        if fell_back:
            FALLBACKS.inc()

    def admitted(self, backend: str, waited_s: float, key: tuple[str, str] | None) -> None:
        """A request let in from the fair admission queue after ``waited_s`` (key labels only with per_key)."""
        self._child(ADMISSION_WAIT_SECONDS, (backend,)).observe(waited_s)
        if self.per_key:
            self._child(ADMITTED_BY_KEY, (backend, *(key or (NONE, NONE)))).inc()
        else:
            self._child(ADMITTED, (backend,)).inc()

    def rejected(self, limit: str) -> None:
        self._child(RATELIMIT_REJECTIONS, (limit,)).inc()

    @staticmethod
    def write_queue(depth: int) -> None:
        WRITE_QUEUE.set(depth)

    @staticmethod
    def write_failed() -> None:
        DB_WRITE_FAILURES.inc()

    @staticmethod
    def state_failed(error: str) -> None:
        STATE_ERRORS.labels(error).inc()


def embedded(purpose: str, *, from_memory: int, from_backend: int) -> None:
    """Texts embedded for the router or the semantic cache, by where their vectors came from."""
    if from_memory:
        EMBEDDED_TEXTS.labels(purpose, "memory").inc(from_memory)
    if from_backend:
        EMBEDDED_TEXTS.labels(purpose, "backend").inc(from_backend)


def guardrail(name: str, outcome: str) -> None:
    """One request's outcome of one guardrail (names and outcomes are a closed set: bounded labels)."""
    GUARDRAILS.labels(name, outcome).inc()


def stream_failover(from_backend: str, to_backend: str) -> None:
    """A stream went on on ``to_backend`` after ``from_backend`` failed mid-way (backend names: bounded labels)."""
    STREAM_FAILOVERS.labels(from_backend, to_backend).inc()


def embedding_failed(purpose: str) -> None:
    EMBEDDING_FAILURES.labels(purpose).inc()


def described_images(source: str, count: int) -> None:
    """Distinct images of a request described for a model without vision: from memory, the table or the describer."""
    if count:
        DESCRIBED_IMAGES.labels(source).inc(count)


def shared_values(names: Iterable[str]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Current values of some series, all workers merged: {sample name: {labels: value}} (for /statsz)."""
    wanted = frozenset(names)
    registry = CollectorRegistry(auto_describe=False)
    if os.environ.get(ENV):
        _multiprocess.MultiProcessCollector(registry)
    else:
        for metric in _COMMON:
            registry.register(metric)
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in wanted:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out
