"""One request as the gateway sees it, and its accounting: admission, cost, the ledger row.

Shared by every surface (chat, completions, embeddings, Messages, Responses) and web-server free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from appliance.accounts.auth import Principal, model_not_allowed
from appliance.accounts.limits import Admission, Limiter, key_scope
from appliance.accounts.usage import NO_COST, Cost, Tokens, cost_of, estimate_prompt
from appliance.common.errors import GatewayError
from appliance.core.catalog import MayUse, Route
from appliance.core.gateway import Gateway, Upstreams
from appliance.guardrails.policy import STATUS_HEADER, Guard
from appliance.observe import metrics
from appliance.observe.metrics import endpoint_label as metrics_endpoint
from appliance.providers.base import Upload
from appliance.storage import ledger, requests_repo

# Client request headers that never travel upstream: the hop, our auth, our own controls.
_PRIVATE_HEADERS = frozenset(
    ("host", "connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade", "content-length", "content-type", "accept-encoding", "authorization",
     "x-api-key", "cookie", "x-request-id", "openai-organization", "openai-project", "expect",
     "x-cache", "x-cache-ttl", "x-guardrails")
)

# The header naming the session a request belongs to (a Responses WebSocket's, or an HTTP client's own).
SESSION_HEADER = "x-appliance-session-id"
_MAX_SESSION_ID = 200

# Names the request's tools the gateway left out (server and hosted tools a chat backend cannot run).
DROPPED_TOOLS_HEADER = "X-Appliance-Dropped-Tools"

# Logged for requests whose client disconnected before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499


class Responder(Protocol):
    """How the pipeline talks back to the client (implemented by the web layer)."""

    async def complete(self, status: int, headers: dict[str, str], body: bytes) -> None: ...

    async def start_stream(self, headers: dict[str, str]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end_stream(self, data: bytes) -> None: ...


class StreamFailover(Protocol):
    """A chat stream's way on to another target when its backend fails mid-way (core/failover.Failover)."""

    failure: GatewayError | None  # the first backend's failure, once another target went on
    note: dict[str, Any] | None  # {"from", "to", "at_token"}, once another target went on

    def watched(self, events: AsyncIterator[list[bytes]], first: list[bytes],
                call: Any) -> AsyncIterator[list[bytes]]: ...

    def logged(self) -> str | None: ...


@dataclass(slots=True)
class Exchange:
    """One client request as the pipeline sees it, and what became of it."""

    path: str
    request_id: str
    upstream_id: str  # the id sent to the backend: UUID-shaped, as some backends insist
    headers: dict[str, str]  # the client's headers that may travel upstream (see forwardable)
    started: float = field(default_factory=time.perf_counter)
    arrived_at: float = field(default_factory=time.time)
    controls: dict[str, str] = field(default_factory=dict)  # X-Appliance-* and X-Cache* sent by the client
    principal: Principal | None = None  # set by the web layer once the key checked out
    body: dict[str, Any] | None = None
    route: Route | None = None  # the target being tried, then the one that answered
    route_name: str | None = None  # the alias (or model) whose plan was followed
    admission: Admission | None = None
    attempts: int = 0
    retries: int = 0
    fallback_from: Route | None = None  # the first target that failed
    cache: str | None = None  # HIT, MISS or BYPASS; None when not cacheable
    streaming: bool = False  # the first byte went out: no more retries
    recorded: bool = False
    session_id: str | None = None  # set by the WebSocket route; else the client's X-Appliance-Session-ID
    notes: dict[str, str] | None = None  # headers a surface adds to every answer (e.g. dropped tools)
    method: str | None = None  # the HTTP method and the caller's address, for the access log (set by the
    client: str | None = None  # web layer; None for a WebSocket turn or a batch line)
    in_flight: bool = False  # counted in appliance_inflight_requests until recorded
    response_body: bytes | None = None  # the whole answer sent, kept only for [log] store_bodies
    batch_id: str | None = None  # set for a batch line: its ledger row names the batch
    upstreams: Upstreams | None = None  # the backends of the config generation the request started in
    backend: str | None = None  # a /proxy call's backend (it has no route)
    upload: Upload | None = None  # a multipart body streamed through (core/uploads.py), sent instead of ``body``
    side_tokens: int = 0  # what calls made for this request used (image descriptions): settled with it
    side_cost: float = 0.0
    # What the machines behind it cost: USD over every attempt on a backend with a cost_per_hour (None: none
    # was), and the attempt still running on one: (backend, its share-clock mark, USD per busy second).
    compute_cost: float | None = None
    compute_open: tuple[str, float, float] | None = None
    template: str | None = None  # "id@version" of the prompt template the request used (core/templates.py)
    guard: Guard | None = None  # the request's guardrails and their outcomes; None: no guardrail applies
    failover: StreamFailover | None = None  # a chat stream's way on to another target if its backend fails mid-way

    def session(self) -> str | None:
        """The session id for the request log: the connection's, or a sane one the client sent."""
        return self.session_id if self.session_id is not None else session_id_of(self.controls.get(SESSION_HEADER))

    def response_headers(self) -> dict[str, str]:
        headers = {"X-Request-ID": self.request_id}
        if self.route is not None:
            headers["X-Appliance-Backend"] = self.route.backend
            headers["X-Appliance-Model"] = headers["X-Model-Used"] = self.route.upstream_model
        elif self.backend is not None:
            headers["X-Appliance-Backend"] = self.backend
        if self.route_name is not None:
            headers["X-Appliance-Route"] = self.route_name
        if self.attempts:
            headers["X-Appliance-Attempts"] = str(self.attempts)
            headers["X-Retry-Count"] = str(self.retries)
        if self.fallback_from is not None:
            headers["X-Fallback-From"] = f"{self.fallback_from.backend}/{self.fallback_from.upstream_model}"
        if self.cache is not None:
            headers["X-Cache"] = self.cache
        if self.admission is not None:
            headers.update(self.admission.headers)
        if self.notes:
            headers.update(self.notes)
        if self.guard is not None:
            headers[STATUS_HEADER] = self.guard.status()
        return headers


def session_id_of(sent: str | None) -> str | None:
    """A client's session id, if it is one worth logging (short and printable)."""
    return sent if sent and len(sent) <= _MAX_SESSION_ID and sent.isprintable() else None


def forwardable(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Client headers that may reach a backend (names lower-cased, as the web layer gives them)."""
    return {k: v for k, v in headers
            if k not in _PRIVATE_HEADERS and not k.startswith(("x-appliance-", "sec-websocket-"))}


def controls(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client's instructions to the gateway itself: X-Appliance-* and the cache headers."""
    return {k: v for k, v in headers if k.startswith(("x-appliance-", "x-cache", "x-guardrails"))}



def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def allowed_routes(gw: Gateway, x: Exchange, routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """The routes the key may use (the catalog's one rule), or 403 model_not_allowed."""
    principal = x.principal
    if principal is None:  # fail closed: only the web layer's auth step sets a principal
        raise GatewayError("invalid_api_key", "This request was not authenticated.")
    allowed = gw.catalog.allowed(routes, principal.may_use)
    if not allowed:
        raise model_not_allowed(routes[0].model)  # named as the client sent it
    return allowed


def may_use(x: Exchange) -> MayUse:
    """The request's key's model patterns, for error messages that list models; no key: none may be named."""
    return x.principal.may_use if x.principal is not None else _no_model


def _no_model(_name: str) -> bool:
    return False


def upstream_key(x: Exchange, backend: str) -> str | None:
    """The request's key's own secret for ``backend`` (BYOK); None: the backend's configured api_key goes."""
    keys = x.principal.upstream_keys if x.principal is not None else None
    if not keys or backend not in keys:
        return None
    secret = keys[backend]
    if secret is None:  # sealed with a key file that is gone: never fall back to the backend's own key
        raise GatewayError("upstream_key_unreadable", f"This key's own credential for backend {backend!r} cannot "
                           "be decrypted on this appliance; an admin must set it again.")
    return secret


def upstreams(gw: Gateway, x: Exchange) -> Upstreams:
    """The backends ``x`` started with: a reload while it runs does not change them under it."""
    if x.upstreams is None:
        x.upstreams = gw.upstreams
    return x.upstreams


def begin(gw: Gateway, x: Exchange) -> None:
    """The request is being served: counted in flight until ``record``."""
    if not x.in_flight:
        x.in_flight = True
        gw.metrics.request_started()


async def admit(gw: Gateway, x: Exchange, body: dict[str, Any], route: Route, *, counts_tokens: bool = True) -> None:
    """Count the request against its key's and its model's limits and budget, or refuse it (429)."""
    scopes = tuple(scope for scope in (key_scope(x.principal), gw.model_scopes.of(route.backend, route.upstream_model))
                   if scope is not None)
    if not scopes:
        return
    prompt = estimate_prompt(body)
    most = body.get("max_completion_tokens") or body.get("max_tokens")
    expected = Tokens(prompt, most if isinstance(most, int) else 0)
    cost = cost_of(gw.prices.of(route.backend, route.upstream_model), expected).total
    shown = next((scope for scope in scopes if scope.rpm or scope.tpm), None)
    limiter = gw.limiter
    compute = gw.compute.per_second(route.backend) > 0
    try:
        if isinstance(limiter, Limiter):
            x.admission = limiter.admit(scopes, tokens=prompt, cost=cost, counts_tokens=counts_tokens,
                                        headers_for=shown, compute=compute)
        else:  # [state] url: one round trip to Redis
            x.admission = await limiter.admit(scopes, tokens=prompt, cost=cost, counts_tokens=counts_tokens,
                                              headers_for=shown, compute=compute)
    except GatewayError as exc:
        _refused(gw, exc)
        raise


async def admit_key(gw: Gateway, x: Exchange) -> None:
    """A request that names no model (a /proxy call): only its key's request and concurrency limits apply."""
    scope = key_scope(x.principal)
    if scope is None:
        return
    limiter = gw.limiter
    shown = scope if scope.rpm else None
    try:
        if isinstance(limiter, Limiter):
            x.admission = limiter.admit((scope,), tokens=0, cost=0, counts_tokens=False, headers_for=shown)
        else:
            x.admission = await limiter.admit((scope,), tokens=0, cost=0, counts_tokens=False, headers_for=shown)
    except GatewayError as exc:
        _refused(gw, exc)
        raise


def _refused(gw: Gateway, refusal: GatewayError) -> None:
    if refusal.status == 429:  # not a 503 state_unavailable: no limit refused that one
        gw.metrics.rejected(_limit_of(refusal))


def _limit_of(refusal: GatewayError) -> str:
    """Which limit refused a request: requests, tokens, concurrency or budget (the metrics label)."""
    if refusal.code == "budget_exceeded":
        return "budget"
    return str(refusal.extra.get("limit", "tokens"))  # a request larger than tpm carries no "limit"


def usage_extras(cost: Cost, x: Exchange, ttft_s: float | None) -> dict[str, Any]:
    """What the gateway adds to a response's usage object (the names Lunar's API uses), and the compute cost
    where a backend with a cost_per_hour ran the request (as ``compute_cost`` last closed it)."""
    extras: dict[str, Any] = cost.as_usage()
    extras["latency_ms"] = round((time.perf_counter() - x.started) * 1000, 3)
    extras["ttft_ms"] = round(ttft_s * 1000, 3) if ttft_s is not None else None
    if x.compute_cost is not None:
        extras["compute_cost_usd"] = round(x.compute_cost, 9)
    return extras


def charge_from(gw: Gateway, x: Exchange, backend: str, mark: float) -> None:
    """An attempt on ``backend`` began at share-clock ``mark`` (Breakers.begin): it is charged its share of the
    backend's busy time until ``compute_cost`` closes it, when the backend has a cost_per_hour."""
    per_s = gw.compute.per_second(backend)
    if per_s:
        x.compute_open = (backend, mark, per_s)
        if x.compute_cost is None:
            x.compute_cost = 0.0


def compute_cost(gw: Gateway, x: Exchange) -> float | None:
    """The compute cost so far, the running attempt's share charged up to now (and closed: the answer is being
    accounted). None when no attempt ran on a backend with a cost_per_hour."""
    running = x.compute_open
    if running is not None:
        x.compute_open = None
        backend, mark, per_s = running
        x.compute_cost = (x.compute_cost or 0.0) + gw.breakers.share_since(backend, mark) * per_s
    return x.compute_cost


def price_of(gw: Gateway, x: Exchange, tokens: Tokens) -> Cost:
    if x.route is None:
        return NO_COST
    return cost_of(gw.prices.of(x.route.backend, x.route.upstream_model), tokens)


def record(
    gw: Gateway,
    x: Exchange,
    status: int,
    *,
    tokens: Tokens | None = None,
    cost: Cost | None = None,
    error_code: str | None = None,
    overhead_s: float | None = None,
    ttft_s: float | None = None,
) -> None:
    """Once per request: release its limits with what it really used, journal its ledger entry (written to the
    database at the next flush)."""
    if x.recorded:
        return
    x.recorded = True
    if cost is None:
        cost = price_of(gw, x, tokens) if tokens else NO_COST
    compute = compute_cost(gw, x)
    if x.admission is not None:
        gw.limiter.settle(x.admission, tokens=(tokens.total if tokens else 0) + x.side_tokens,
                          cost=cost.total + x.side_cost, compute_cost=compute or 0.0)
    body = x.body or {}
    model = body.get("model")
    model = model if isinstance(model, str) else None
    key_id = x.principal.key_id if x.principal else None
    backend = x.route.backend if x.route else x.backend
    backend_model = x.route.upstream_model if x.route else None
    priced = tokens is not None and (tokens.prompt is not None or tokens.completion is not None)
    row = requests_repo.RequestRecord(
        request_id=x.request_id,
        created_at=x.arrived_at,
        endpoint=x.path,
        model=model,
        backend=backend,
        backend_model=backend_model,
        status=status,
        error_code=error_code,
        stream=bool(body.get("stream")),
        latency_ms=round((time.perf_counter() - x.started) * 1000, 3),
        overhead_ms=round(overhead_s * 1000, 3) if overhead_s is not None else None,
        ttft_ms=round(ttft_s * 1000, 3) if ttft_s is not None else None,
        prompt_tokens=tokens.prompt if tokens else None,
        completion_tokens=tokens.completion if tokens else None,
        estimated=bool(tokens and tokens.estimated),
        key_id=key_id,
        cached_tokens=tokens.cached if tokens else None,
        input_cost_usd=cost.input if priced else None,
        output_cost_usd=cost.output if priced else None,
        cost_usd=cost.total if priced else None,
        cache=x.cache,
        session_id=x.session(),
        batch_id=x.batch_id,
        compute_cost_usd=round(compute, 9) if compute is not None else None,
        template=x.template,
        guardrails=_guardrails_log(x.guard),
        failover=x.failover.logged() if x.failover is not None else None,
    )
    bodies = None
    if gw.settings.log.store_bodies:
        bodies = ledger.bodies_of(orjson.dumps(x.body) if x.body is not None else None, x.response_body,
                                  gw.settings.log.max_body_kb * 1024)
    gw.writer.add_entry(ledger.Entry(row, bodies))
    observe(gw, x, row)


def record_side_call(gw: Gateway, x: Exchange, route: Route, tokens: Tokens, seconds: float) -> None:
    """A call the gateway made to another model for ``x`` (an image description): a ledger row of its own, under
    the request's id and key, so the key's usage shows it; its tokens and cost also settle with the request's
    own limits and budget (``record``)."""
    cost = cost_of(gw.prices.of(route.backend, route.upstream_model), tokens)
    x.side_tokens += tokens.total
    x.side_cost += cost.total
    row = requests_repo.RequestRecord(
        request_id=x.request_id, created_at=time.time(), endpoint=x.path, model=route.model, backend=route.backend,
        backend_model=route.upstream_model, status=200, error_code=None, stream=False,
        latency_ms=round(seconds * 1000, 3), overhead_ms=None, ttft_ms=None, prompt_tokens=tokens.prompt,
        completion_tokens=tokens.completion, estimated=False, key_id=x.principal.key_id if x.principal else None,
        cached_tokens=None, input_cost_usd=cost.input, output_cost_usd=cost.output, cost_usd=cost.total, cache=None,
        session_id=x.session(), batch_id=x.batch_id)
    gw.writer.add_entry(ledger.Entry(row))


def _guardrails_log(guard: Guard | None) -> str | None:
    """The request log's guardrails column, and the metric: once per request, as ``record`` is."""
    if guard is None:
        return None
    outcomes = guard.log()
    for name, outcome in outcomes.items():
        metrics.guardrail(name, outcome)
    return orjson.dumps(outcomes).decode()


def record_failure(gw: Gateway, x: Exchange, failure: BaseException) -> None:
    """The ledger row of a request that ``failure`` ended: its error, the client leaving, or our own bug."""
    if isinstance(failure, GatewayError):
        record(gw, x, failure.status, error_code=failure.code)
    elif isinstance(failure, asyncio.CancelledError):  # the client went away; the upstream call went with it
        record(gw, x, CLIENT_CLOSED, error_code="client_closed")
    else:
        record(gw, x, 500, error_code="internal_error")


def observe(gw: Gateway, x: Exchange, row: requests_repo.RequestRecord) -> None:
    """What else a finished request feeds: metrics and the access log."""
    principal = x.principal
    if x.in_flight:
        x.in_flight = False
        gw.metrics.request_ended()
    gw.metrics.request_finished(
        endpoint=metrics_endpoint(row.endpoint), model=gw.metrics.model_label(row.model, x.route_name),
        backend=row.backend, status=row.status, cache=row.cache,
        key=(principal.key_id, principal.name) if principal is not None else None,
        latency_s=row.latency_ms / 1000, overhead_s=row.overhead_ms / 1000 if row.overhead_ms is not None else None,
        ttft_s=row.ttft_ms / 1000 if row.ttft_ms is not None else None, prompt_tokens=row.prompt_tokens or 0,
        completion_tokens=row.completion_tokens or 0, cost_usd=row.cost_usd or 0.0, retries=x.retries,
        fell_back=x.fallback_from is not None, compute_cost_usd=row.compute_cost_usd)
    if gw.access_log is not None:
        gw.access_log.write({**row._asdict(), "time": row.created_at, "path": row.endpoint, "method": x.method,
                             "client": x.client})
