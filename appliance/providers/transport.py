"""The one seam for upstream HTTP: a pooled aiohttp client per worker.

aiohttp, not httpx: a bare proxy measured on this machine cost 0.20 / 0.12 ms CPU per request
(c=1 / c=16) with aiohttp against 0.42 / 0.30 ms for httpx over the aiohttp transport and
0.64 / 1.09 ms for httpx's default transport (see the core issue). Nothing outside this module
imports aiohttp, so the choice can be revisited here alone.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from yarl import URL


@contextmanager
def _bare_default_tls_contexts() -> Iterator[None]:
    """aiohttp builds two default TLS contexts when imported, each reading the system's CA bundle: 80-100 ms of
    every start, for contexts the Transport never uses (it brings its own, built on a worker's first https
    call). Under this, those two get no CA at all: were one used, every certificate would fail to verify."""
    create, load = ssl.create_default_context, ssl.SSLContext.set_default_verify_paths
    ssl.create_default_context = lambda *_, **__: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # type: ignore[assignment]
    ssl.SSLContext.set_default_verify_paths = lambda _self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        ssl.create_default_context, ssl.SSLContext.set_default_verify_paths = create, load  # type: ignore[method-assign]


with _bare_default_tls_contexts():
    import aiohttp


class TransportError(Exception):
    """Base of the failures a caller maps to gateway errors."""


class ConnectError(TransportError):
    """The backend refused or could not be reached."""


class ReadError(TransportError):
    """The connection broke while the request or response was in flight."""


class Timeout(TransportError):
    """The backend took longer than allowed."""


@dataclass(frozen=True, slots=True)
class Limits:
    total_s: float
    connect_s: float


# A request body: whole, or streamed from an async iterator of chunks (sent chunked unless the headers give
# its Content-Length).
Body = bytes | AsyncIterable[bytes] | None

# Headers aiohttp would add of its own; a raw request (see Transport.stream) sends only the caller's.
_AUTO_HEADERS = ("Accept", "Content-Type")


@dataclass(slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_s: float  # time spent waiting on the backend


class StreamResponse:
    """An upstream response whose body is read as it arrives."""

    def __init__(self, raw: aiohttp.ClientResponse, started: float) -> None:
        self._raw = raw
        self.status = raw.status
        self.headers: Mapping[str, str] = raw.headers
        self.headers_after_s = time.perf_counter() - started

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._raw.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise Timeout(str(exc) or "read timed out") from exc
        except aiohttp.ClientError as exc:
            raise ReadError(str(exc) or type(exc).__name__) from exc

    async def read(self) -> bytes:
        try:
            return await self._raw.read()
        except TimeoutError as exc:
            raise Timeout(str(exc) or "read timed out") from exc
        except aiohttp.ClientError as exc:
            raise ReadError(str(exc) or type(exc).__name__) from exc


class Transport:
    """One connection pool per worker; create inside the worker's event loop."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._timeouts: dict[Limits, aiohttp.ClientTimeout] = {}
        self._tls: ssl.SSLContext | None = None

    @classmethod
    async def open(cls) -> Transport:
        # Idle connections are dropped after 4 s, below uvicorn's 5 s default (vLLM, llama-cpp-python),
        # so a request rarely lands on a socket the backend is closing.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies pass through byte for byte
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            json_serialize=None,
        )
        return cls(session)

    async def close(self) -> None:
        await self._session.close()

    def _timeout(self, limits: Limits) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(limits)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=limits.total_s, sock_connect=limits.connect_s)
            self._timeouts[limits] = timeout
        return timeout

    async def _send(self, method: str, url: str, limits: Limits, headers: Mapping[str, str] | None,
                    body: Body, raw: bool = False) -> aiohttp.ClientResponse:
        """Send; a body of chunks goes out as they come (with the caller's Content-Length, else chunked)."""
        timeout = self._timeout(limits)
        target: str | URL = URL(url, encoded=True) if raw else url
        skip = _AUTO_HEADERS if raw else ()
        tls: ssl.SSLContext | bool = True  # plain http: aiohttp's default, never used
        if url.startswith("https:"):
            if self._tls is None:  # the CA bundle is read once per worker, off the event loop
                self._tls = await asyncio.to_thread(ssl.create_default_context)
            tls = self._tls
        try:
            try:
                return await self._session.request(
                    method, target, data=body, headers=headers, timeout=timeout, allow_redirects=False,
                    skip_auto_headers=skip, ssl=tls,
                )
            except aiohttp.ServerDisconnectedError:
                if body is not None and not isinstance(body, bytes):
                    raise  # chunks may be gone with the socket: whether to try again is the caller's call
                # A pooled keep-alive socket closed under us before any answer: one fresh attempt.
                return await self._session.request(
                    method, target, data=body, headers=headers, timeout=timeout, allow_redirects=False,
                    skip_auto_headers=skip, ssl=tls,
                )
        except TimeoutError as exc:
            raise Timeout(str(exc) or "timed out") from exc
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise ReadError(str(exc) or type(exc).__name__) from exc

    async def request(
        self,
        method: str,
        url: str,
        *,
        limits: Limits,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """A whole request and its whole answer."""
        started = time.perf_counter()
        raw = await self._send(method, url, limits, headers, body)
        try:
            data = await raw.read()
        except TimeoutError as exc:
            raw.close()
            raise Timeout(str(exc) or "read timed out") from exc
        except aiohttp.ClientError as exc:
            raw.close()
            raise ReadError(str(exc) or type(exc).__name__) from exc
        except BaseException:  # cancelled: drop the connection so the backend sees the client leave
            raw.close()
            raise
        raw.release()
        return Response(raw.status, raw.headers, data, time.perf_counter() - started)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        limits: Limits,
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        raw_url: bool = False,
    ) -> AsyncIterator[StreamResponse]:
        """A request whose answer is read as it arrives.

        ``raw_url``: the URL is already percent-encoded and goes out exactly as written (no re-quoting, no
        dot-segment folding), and no header is added but Host and the body's framing (a passthrough).
        """
        started = time.perf_counter()
        raw = await self._send(method, url, limits, headers, body, raw_url)
        try:
            yield StreamResponse(raw, started)
        finally:
            # close(), not release(): an unfinished body must drop the connection so the backend
            # sees the client leave and stops generating.
            if raw.content.at_eof():
                raw.release()
            else:
                raw.close()
