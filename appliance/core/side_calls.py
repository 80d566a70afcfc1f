"""Calls the gateway makes to a model for itself: embeddings, image descriptions, moderation verdicts.

The model name is resolved like a client's (an alias's targets are tried in config order) and the call goes
straight to the provider of each route in turn: no HTTP request to ourselves, no key. Whatever goes wrong is a
failure of the gateway's own backend (a 5xx): never the client's 4xx, and never an upstream body passed on as
if it answered the client's request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from appliance.common.errors import CODES, GatewayError
from appliance.core.catalog import Catalog, Route
from appliance.providers.base import Call, Provider, Reply
from appliance.providers.transport import Limits

T = TypeVar("T")

_CONNECT_TIMEOUT_S = 3.0
# The 5xx a side call passes on as they are; any other failure is backend_error (a side call's model that cannot
# serve its endpoint, `unsupported`, is the config's fault, not the client's).
_BACKEND_FAILURES = frozenset(code for code, (status, _) in CODES.items()
                              if status >= 500 and code not in ("internal_error", "unsupported"))


async def ask(catalog: Catalog, providers: Mapping[str, Provider], model: str, endpoint: str, *,
              body: Callable[[Route], dict[str, Any]], read: Callable[[Route, Reply], T], request_id: str,
              timeout_s: float, what: str) -> T:
    """``read`` of the first route of ``model`` that answers ``endpoint``; ``read`` raises ValueError for an
    answer it cannot use (the next route is tried). ``what`` names the model in errors ("the describer model")."""
    try:
        routes = catalog.plan(model).routes
    except GatewayError:
        routes = ()
    limits = Limits(timeout_s, min(timeout_s, _CONNECT_TIMEOUT_S))
    failure: GatewayError | None = None
    for route in routes:
        provider = providers.get(route.backend)
        if provider is None or not provider.supports(endpoint):
            continue
        try:
            return read(route, await provider.send(Call(endpoint, body(route), request_id, limits=limits)))
        except GatewayError as exc:
            failure = exc
        except ValueError as exc:  # orjson's decode error among them
            failure = GatewayError("backend_error", f"backend {route.backend!r} sent an unusable answer: {exc}")
    if failure is None:
        failure = GatewayError("no_healthy_backend", f"no backend serves /v1/{endpoint} with it right now")
    code = failure.code if failure.code in _BACKEND_FAILURES else "backend_error"
    headers = {k: v for k, v in failure.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
    raise GatewayError(code, f"{what[0].upper()}{what[1:]} {model!r} failed: {failure.message}", headers=headers)
