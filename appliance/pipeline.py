"""One request's journey: validate -> resolve the model -> admit -> call the backend -> relay -> account.

Web-server free: the route hands in an Exchange and a Responder and renders any GatewayError.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from appliance.auth import Principal
from appliance.catalog import Route
from appliance.errors import GatewayError
from appliance.gateway import Gateway
from appliance.limits import Admission, key_scope
from appliance.providers.base import CHAT, COMPLETIONS, EMBEDDINGS, Call
from appliance.sse import DONE
from appliance.storage import requests_repo, usage_repo
from appliance.usage import NO_COST, Cost, StreamMeter, Tokens, cost_of, estimate_prompt, from_reply

# Body fields that steer the gateway and must not reach a backend.
GATEWAY_FIELDS = ("fallbacks", "fallback", "provider", "timeout", "retries")

# Client request headers that never travel upstream: the hop, our auth, our own controls.
_PRIVATE_HEADERS = frozenset(
    ("host", "connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade", "content-length", "content-type", "accept-encoding", "authorization",
     "x-api-key", "cookie", "x-request-id", "openai-organization", "openai-project", "expect")
)

# Logged for requests whose client disconnected before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499

_REQUIRED = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


class Responder(Protocol):
    """How the pipeline talks back to the client (implemented by the web layer)."""

    async def complete(self, status: int, headers: dict[str, str], body: bytes) -> None: ...

    async def start_stream(self, headers: dict[str, str]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end_stream(self, data: bytes) -> None: ...


@dataclass(slots=True)
class Exchange:
    """One client request as the pipeline sees it, and what became of it."""

    path: str
    request_id: str
    upstream_id: str  # the id sent to the backend: UUID-shaped, as some backends insist
    headers: dict[str, str]  # the client's headers that may travel upstream (see forwardable)
    started: float = field(default_factory=time.perf_counter)
    arrived_at: float = field(default_factory=time.time)
    principal: Principal | None = None  # set by the web layer once the key checked out
    body: dict[str, Any] | None = None
    route: Route | None = None
    admission: Admission | None = None
    recorded: bool = False

    def response_headers(self) -> dict[str, str]:
        headers = {"X-Request-ID": self.request_id}
        if self.route is not None:
            headers["X-Appliance-Backend"] = self.route.backend
            headers["X-Appliance-Model"] = self.route.upstream_model
        if self.admission is not None:
            headers.update(self.admission.headers)
        return headers


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise GatewayError("invalid_json", "The request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError("invalid_json", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError("invalid_json", "The request body must be a JSON object.")
    return body


def validate(endpoint: str, body: dict[str, Any]) -> None:
    """The few checks the gateway needs; everything else is the backend's to judge."""
    model = body.get("model")
    if model is None:
        raise GatewayError("missing_field", "You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise GatewayError("invalid_value", "'model' must be a non-empty string.", param="model")
    required = _REQUIRED[endpoint]
    if body.get(required) is None:
        raise GatewayError("missing_field", f"Missing required parameter: '{required}'.", param=required)
    if endpoint == CHAT:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise GatewayError("invalid_value", "'messages' must be a non-empty array.", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise GatewayError("invalid_value", f"messages[{i}] must be an object with a 'role'.",
                                   param=f"messages.[{i}].role")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError("invalid_value", "'stream' must be a boolean.", param="stream")
    if endpoint == EMBEDDINGS and stream:
        raise GatewayError("invalid_value", "Embeddings cannot be streamed.", param="stream")


def forwardable(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Client headers that may reach a backend (names lower-cased, as the web layer gives them)."""
    return {k: v for k, v in headers if k not in _PRIVATE_HEADERS and not k.startswith("x-appliance-")}


def _upstream_body(body: dict[str, Any], route: Route) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    out["model"] = route.upstream_model
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def check_model(x: Exchange, route: Route) -> None:
    """The key may use a model by the name the client sent or by the backend model that serves it."""
    if x.principal is None:  # fail closed: only the web layer's auth step sets a principal
        raise GatewayError("invalid_api_key", "This request was not authenticated.")
    x.principal.check_model(route.model, f"{route.backend}/{route.upstream_model}", route.upstream_model)


def admit(gw: Gateway, x: Exchange, body: dict[str, Any], route: Route, *, counts_tokens: bool = True) -> None:
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
    x.admission = gw.limiter.admit(scopes, tokens=prompt, cost=cost, counts_tokens=counts_tokens, headers_for=shown)


def usage_extras(cost: Cost, x: Exchange, ttft_s: float | None) -> dict[str, Any]:
    """What the gateway adds to a response's usage object (the names Lunar's API uses)."""
    extras: dict[str, Any] = cost.as_usage()
    extras["latency_ms"] = round((time.perf_counter() - x.started) * 1000, 3)
    extras["ttft_ms"] = round(ttft_s * 1000, 3) if ttft_s is not None else None
    return extras


def _price_of(gw: Gateway, x: Exchange, tokens: Tokens) -> Cost:
    if x.route is None:
        return NO_COST
    return cost_of(gw.prices.of(x.route.backend, x.route.upstream_model), tokens)


async def proxy(gw: Gateway, endpoint: str, raw: bytes, x: Exchange, responder: Responder) -> None:
    """Serve chat/completions, completions or embeddings."""
    try:
        x.body = body = parse_body(raw)
        validate(endpoint, body)
        await gw.wait_discovered()
        x.route = route = gw.catalog.resolve(body["model"])
        check_model(x, route)
        provider = gw.providers[route.backend]
        if not provider.supports(endpoint) or (
            endpoint == EMBEDDINGS and gw.catalog.capability(route, "embeddings") is False
        ):
            raise GatewayError("unsupported", f"{route.upstream_model!r} on backend {route.backend!r} "
                               f"does not serve /v1/{endpoint}", param="model")
        admit(gw, x, body, route)
        call = Call(endpoint, _upstream_body(body, route), x.upstream_id, x.headers)
        if body.get("stream"):
            await _relay_stream(gw, call, x, responder)
        else:
            await _answer(gw, call, x, responder)
    except GatewayError as exc:
        record(gw, x, exc.status, error_code=exc.code)
        raise
    except asyncio.CancelledError:  # the client went away; the upstream call was cancelled with it
        record(gw, x, CLIENT_CLOSED, error_code="client_closed")
        raise
    except Exception:
        record(gw, x, 500, error_code="internal_error")
        raise


async def _answer(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> None:
    provider = gw.providers[x.route.backend]  # type: ignore[union-attr]
    reply = await provider.send(call)
    latency = time.perf_counter() - x.started
    tokens = from_reply(reply.data, call.body)
    cost = _price_of(gw, x, tokens)
    body = _with_usage_extras(reply.data, tokens, usage_extras(cost, x, latency))
    headers = {**reply.headers, **x.response_headers(), "X-Appliance-Cost-Usd": f"{cost.total:.9f}",
               "X-Appliance-Latency-Ms": _ms(latency), "X-Appliance-Overhead-Ms": _ms(latency - reply.upstream_s)}
    await responder.complete(200, headers, body)
    record(gw, x, 200, tokens=tokens, cost=cost, overhead_s=latency - reply.upstream_s, ttft_s=latency)


def _with_usage_extras(data: dict[str, Any] | None, tokens: Tokens, extras: dict[str, Any]) -> bytes:
    """The answer with cost and timings in its usage (which is added, marked estimated, when missing)."""
    assert data is not None  # providers parse every non-streaming answer
    usage = data.get("usage")
    if isinstance(usage, dict):
        usage.update(extras)
    else:
        data["usage"] = {**tokens.as_usage(), **extras}
    return orjson.dumps(data)


async def _relay_stream(gw: Gateway, call: Call, x: Exchange, responder: Responder) -> None:
    stream_options = call.body.get("stream_options")
    client_wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    if not client_wants_usage:  # ask anyway, to account the tokens; the meter drops it again
        call.body["stream_options"] = {**(stream_options if isinstance(stream_options, dict) else {}),
                                       "include_usage": True}
    meter = StreamMeter(client_wants_usage=client_wants_usage,
                        extras=lambda tokens: usage_extras(_price_of(gw, x, tokens), x, _ttft(meter, x)))
    provider = gw.providers[x.route.backend]  # type: ignore[union-attr]
    async with provider.stream(call) as upstream:
        first_byte = time.perf_counter() - x.started
        overhead = first_byte - upstream.headers_after_s
        await responder.start_stream({**upstream.headers, **x.response_headers(),
                                      "X-Appliance-Latency-Ms": _ms(first_byte),
                                      "X-Appliance-Overhead-Ms": _ms(overhead)})
        try:
            async for events in upstream:
                data = meter.feed(events)
                if data:
                    await responder.send(data)
        except asyncio.CancelledError:
            record(gw, x, CLIENT_CLOSED, tokens=meter.final_tokens(call.body), error_code="client_closed",
                   overhead_s=overhead, ttft_s=_ttft(meter, x))
            raise
        except GatewayError as exc:
            # The status line is gone: the failure travels as an SSE error event, then [DONE].
            await responder.end_stream(exc.sse_event(x.request_id) + DONE)
            record(gw, x, 200, tokens=meter.final_tokens(call.body), error_code=exc.code,
                   overhead_s=overhead, ttft_s=_ttft(meter, x))
            return
        await responder.end_stream(meter.finish(call.body))
    error_code = None
    if meter.error is not None:
        error_code = str(meter.error.get("code") or meter.error.get("type") or "backend_error")
    record(gw, x, 200, tokens=meter.final_tokens(call.body), error_code=error_code, overhead_s=overhead,
           ttft_s=_ttft(meter, x))


def _ttft(meter: StreamMeter, x: Exchange) -> float | None:
    return meter.first_event_at - x.started if meter.first_event_at else None


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
    """Once per request: release its limits with what it really used, queue its ledger row and rollup."""
    if x.recorded:
        return
    x.recorded = True
    if cost is None:
        cost = _price_of(gw, x, tokens) if tokens else NO_COST
    if x.admission is not None:
        gw.limiter.settle(x.admission, tokens=tokens.total if tokens else 0, cost=cost.total)
    body = x.body or {}
    model = body.get("model")
    model = model if isinstance(model, str) else None
    key_id = x.principal.key_id if x.principal else None
    backend = x.route.backend if x.route else None
    backend_model = x.route.upstream_model if x.route else None
    priced = tokens is not None and tokens.prompt is not None
    requests_repo.record(gw.writer, requests_repo.RequestRecord(
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
    ))
    if key_id is not None:
        usage_repo.add_to_rollup(
            gw.writer, usage_repo.day_of(x.arrived_at), key_id, model or "", backend or "", backend_model or "",
            error=status >= 400 or error_code is not None, prompt=tokens.prompt or 0 if tokens else 0,
            completion=tokens.completion or 0 if tokens else 0, cached=tokens.cached if tokens else 0,
            cost=cost.total)
