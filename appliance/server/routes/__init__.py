"""Thin handlers: parse, call the pipeline, render."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sanic import Blueprint

from appliance.common.paths import alias_of

_READ = frozenset(("GET", "HEAD"))
_ALIAS_NAME = "_api"  # suffix of an alias route's name (Sanic wants every route name unique)


class Routes(Blueprint):
    """A Blueprint whose GET routes answer HEAD too, and whose /v1/ routes answer under /api/v1/ as well.

    HEAD: the same status and headers, no body (RFC 9110 9.3.2); Sanic routes HEAD only where a route
    names it, and leaves out the body of any answer to a HEAD itself.
    /api/v1/: the same handler registered a second time, so Sanic's router tells the spellings apart at
    no cost per request (common/paths.py says how the rest of the appliance treats them as one).
    """

    def get(self, uri: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("ignore_body", True)  # what Blueprint.get does: a GET's body is not read
        return self.route(uri, *args, methods=_READ, **kwargs)

    def route(self, uri: str, *args: Any, **kwargs: Any) -> Any:
        # Every error leaves through GatewayErrorHandler, whatever the format; left unset, Sanic reads and
        # parses each handler's source to guess one (~2 ms a route: over 0.2 s of every start).
        kwargs["error_format"] = kwargs.get("error_format") or "json"
        register = super().route(uri, *args, **kwargs)
        alias = alias_of(uri)
        if alias is None:
            return register
        name = kwargs.pop("name", None)

        def both(handler: Callable[..., Any]) -> Callable[..., Any]:
            alias_name = (name or handler.__name__) + _ALIAS_NAME
            super(Routes, self).route(alias, *args, name=alias_name, **kwargs)(handler)
            return register(handler)

        return both
