"""Query strings as the routes read them: a blank value (``?limit=``) is a value, not an absent parameter."""

from __future__ import annotations

from sanic import Request
from sanic.request import RequestParameters


def query_args(request: Request) -> RequestParameters:
    # Sanic drops blank values by default, so ``?to=`` silently meant "no bound" and ``?limit=`` the default;
    # kept, a blank is checked like any other value and refused with the parameter named (the fuzzer of
    # /openapi.json sent them). Sanic caches the parse per request.
    return request.get_args(keep_blank_values=True)
