"""Who may call what: the request middleware that turns a presented key into a principal.

Public without a key: liveness, readiness, the status page and its files, and the OpenAPI document (it
describes the routes, the same for every installation of a version, and holds nothing of the configuration).
/statsz answers loopback callers without a key (anyone with ``[status] public``); the page asks for a key
when /statsz does.
Everything else needs one; its role and endpoint patterns are checked here, its
model patterns and limits in the pipeline (which knows the model).
"""

from __future__ import annotations

from ipaddress import ip_address

from sanic import Request

from appliance.accounts.auth import presented_key
from appliance.common.paths import canonical

PUBLIC_PATHS = frozenset(("/health", "/healthz", "/ready", "/", "/status", "/openapi.json"))
PUBLIC_PREFIXES = ("/static/",)
LOOPBACK_PATHS = frozenset(("/statsz",))


def is_public(request: Request) -> bool:
    path = request.path
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    if path == "/metrics":
        return not request.app.ctx.settings.metrics.require_key
    return path in LOOPBACK_PATHS and (request.app.ctx.settings.status.public or from_loopback(request))


def from_loopback(request: Request) -> bool:
    try:
        return ip_address(request.ip).is_loopback
    except ValueError:
        return False


def stands_in(request: Request) -> bool:
    """Is this the request Sanic makes up to answer an error found before a request could be read?

    A header block over the limit or a malformed request line leaves Sanic nothing to route: it answers
    through a stand-in (method ``NONE``, path ``*``, no head, no headers) and runs the request middleware
    on it. There is no key to check on it, and checking anyway would turn the real error into a 401.
    """
    return not request.head and request.method == "NONE"


async def authenticate(request: Request) -> None:
    """Sanic request middleware: set request.ctx.principal or raise 401/403 (rendered per surface)."""
    if is_public(request) or stands_in(request):
        return
    gateway = request.app.ctx.gateway
    headers = request.headers
    principal = await gateway.authenticator.authenticate(
        presented_key(headers.get("authorization"), headers.get("x-api-key")))
    principal.check_endpoint(request.method, canonical(request.path))
    request.ctx.principal = principal
