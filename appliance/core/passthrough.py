"""/proxy/{backend}/{path}: a raw call to one backend, for what the appliance has no route for.

The path is judged as the client sent it, still percent-encoded, and joined to the backend's root URL (its
configured URL less a trailing ``/v1``; providers' ``root``) only when it cannot leave that root or name
another host: no dot segments, encoded or not, no encoded ``/`` or ``\\``, no double encoding, no control
characters, no backslash, nothing absolute. It then goes upstream byte for byte, with the query string.
The client's Host, the hop-by-hop headers and the appliance key stay here; the backend's own key goes
instead. Bodies stream both ways: the request's as it arrives (at most ``server.max_body_mb``), the answer's
chunk by chunk with the backend's status and headers. One ledger row per call.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from appliance.common.errors import GatewayError
from appliance.core.exchange import Exchange, admit_key, begin, ms, record, record_failure, upstream_key, upstreams
from appliance.core.gateway import Gateway
from appliance.providers.base import transport_failure
from appliance.providers.transport import Limits, TransportError

# Headers of one hop (RFC 9110 7.6.1), never forwarded either way; so are those a Connection header names.
HOP_BY_HOP = frozenset(("connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
                        "proxy-connection", "proxy-authenticate", "proxy-authorization"))
# The client's headers that are the appliance's business: its Host, its key, its controls, what the browser
# holds for its origin. Expect is answered here (Sanic sends the 100 Continue).
_CLIENT_ONLY = frozenset(("host", "authorization", "x-api-key", "cookie", "expect", "x-request-id"))
_OURS_PREFIX = "x-appliance-"
# Statuses whose answer has no body (RFC 9110 6.4.1): no Content-Length is passed on with them.
_NO_BODY = frozenset((204, 304))

_PARAM = "path"
# A percent-escape that decodes to a control character (%00-%1F, %7F), a '/' or a '\\', or to '%' itself
# (double encoding: %252e is '%2e' once decoded).
_FORBIDDEN_ESCAPE = re.compile(r"%(?:[01][0-9a-fA-F]|7[fF]|2[fF]|5[cC]|25)")
_ESCAPE = re.compile(r"%([0-9a-fA-F]{2})")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def checked_path(backend: str, path: str) -> str:
    """``path`` (after /proxy/{backend}/, percent-encoded as sent) when it stays under the backend's root.

    Raises 400 invalid_value (param "path") for anything that could leave it or mean two things to two
    servers; ``backend`` (the segment before it) is held to the same rules.
    """
    whole = f"{backend}/{path}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in whole):
        raise _refused("holds a control character")
    if "\\" in whole:
        raise _refused("holds a backslash")
    bad = _FORBIDDEN_ESCAPE.search(whole)
    if bad is not None:
        raise _refused(f"holds the escape {bad.group()} (an encoded '/', '\\', '%' or control character)")
    if path.startswith("/") or _SCHEME.match(path):
        raise _refused("is an absolute URL or path")
    for segment in whole.split("/"):
        # Decoded once (no escape is left that decodes further), and without a ;parameter, which some
        # servers strip before they resolve dot segments.
        name = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), segment).partition(";")[0]
        if name in (".", ".."):
            raise _refused("holds a '.' or '..' segment")
    return path


def _refused(why: str) -> GatewayError:
    return GatewayError("invalid_value", f"The proxied path {why}; send the backend's path as it is, e.g. "
                        "/proxy/vllm/tokenize.", param=_PARAM)


def connection_named(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names a Connection header lists: they belong to this hop too."""
    return frozenset(token.strip().lower() for name, value in headers if name.lower() == "connection"
                     for token in value.split(",") if token.strip())


def request_headers(headers: list[tuple[str, str]], credentials: dict[str, str],
                    request_id: str) -> dict[str, str]:
    """What goes upstream: the client's headers less the hop's and the appliance's, plus the backend's key."""
    dropped = HOP_BY_HOP | _CLIENT_ONLY | connection_named(headers)
    out = {name: value for name, value in headers
           if name not in dropped and not name.startswith(("proxy-", _OURS_PREFIX))}
    out["x-request-id"] = request_id
    out.update(credentials)
    return out


def answer_headers(status: int, headers: Iterable[tuple[str, str]], ours: dict[str, str]) -> list[tuple[str, str]]:
    """What goes back: the backend's headers less the hop's (repeated ones kept, e.g. Set-Cookie), then ours."""
    pairs = list(headers)
    dropped = HOP_BY_HOP | connection_named(pairs) | {name.lower() for name in ours}
    if status in _NO_BODY:
        dropped |= {"content-length"}
    kept = [(name, value) for name, value in pairs
            if name.lower() not in dropped and not name.lower().startswith("proxy-")]
    return kept + list(ours.items())


class Upload:
    """The client's body, handed upstream chunk by chunk as it arrives; refused past ``max_bytes``."""

    def __init__(self, read: Callable[[], Awaitable[bytes | None]], max_bytes: int) -> None:
        self._read = read  # the next chunk, None at the end
        self._max = max_bytes
        self.size = 0
        self.refused: GatewayError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._read()) is not None:
            self.size += len(chunk)
            if self.size > self._max:
                self.refused = body_too_large()
                raise self.refused
            yield chunk


def body_too_large() -> GatewayError:
    return GatewayError("body_too_large", "The request body is larger than this gateway accepts "
                        "(server.max_body_mb).")


@dataclass(slots=True)
class Call:
    """One /proxy call as the client sent it."""

    method: str
    backend: str
    path: str  # after /proxy/{backend}/, percent-encoded as sent
    query: str  # as sent, without the '?'
    headers: list[tuple[str, str]]  # names lower-cased
    body: Upload | None  # None: the request has no body


class RawResponder(Protocol):
    """How a passthrough answer reaches the client (implemented by the web layer)."""

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    async def abort(self) -> None: ...  # the answer cannot be finished: the client must see it cut, not complete


async def forward(gw: Gateway, x: Exchange, call: Call, responder: RawResponder) -> None:
    """Send ``call`` to its backend and relay the answer; every outcome gets its ledger row."""
    begin(gw, x)
    try:
        await _forward(gw, x, call, responder)
    except (Exception, asyncio.CancelledError) as exc:
        record_failure(gw, x, exc)
        raise


async def _forward(gw: Gateway, x: Exchange, call: Call, responder: RawResponder) -> None:
    path = checked_path(call.backend, call.path)
    await gw.wait_discovered()
    provider = upstreams(gw, x).providers.get(call.backend)
    if provider is None:
        known = ", ".join(upstreams(gw, x).providers) or "none"
        raise GatewayError("not_found", f"Unknown backend {call.backend!r} (known: {known}).", param="backend")
    x.backend = call.backend
    _check_declared_size(call.headers, gw.settings.server.max_body_mb)
    await admit_key(gw, x)
    settings = upstreams(gw, x).backends[call.backend]
    limits = Limits(settings.timeout_s, settings.connect_timeout_s)
    url = f"{provider.root}/{path}" + (f"?{call.query}" if call.query else "")
    x.attempts = 1
    try:
        async with gw.transport.stream(call.method, url, limits=limits, raw_url=True, body=call.body,
                                       headers=request_headers(call.headers, provider.credentials_for(
                                           upstream_key(x, call.backend)), x.upstream_id)) as upstream:
            waited = time.perf_counter() - x.started
            overhead = waited - upstream.headers_after_s
            ours = {**x.response_headers(), "X-Appliance-Latency-Ms": ms(waited),
                    "X-Appliance-Overhead-Ms": ms(overhead)}
            await responder.start(upstream.status, answer_headers(upstream.status, upstream.headers.items(), ours))
            try:
                async for chunk in upstream.chunks():
                    await responder.send(chunk)
            except TransportError as exc:  # the status line is gone: the client sees the answer cut short
                failure = transport_failure(exc, call.backend, limits)
                record(gw, x, upstream.status, error_code=failure.code, overhead_s=overhead)
                await responder.abort()
                return
            record(gw, x, upstream.status, overhead_s=overhead)  # journaled before the last byte leaves
            await responder.end()
    except TransportError as exc:
        if call.body is not None and call.body.refused is not None:
            raise call.body.refused from None
        raise transport_failure(exc, call.backend, limits) from exc


def _check_declared_size(headers: list[tuple[str, str]], max_body_mb: float) -> None:
    declared = next((value for name, value in headers if name == "content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > max_body_mb * 1024 * 1024:
        raise body_too_large()

