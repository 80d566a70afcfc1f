"""A backend for /proxy/{backend}/{path}: it records every request as it arrived and scripts a few answers.

  /v1/models           an OpenAI model list (so the appliance sees the backend up)
  /stream              answers "first\\n", waits until the test calls ``release()``, then "second\\n"
  /upload              reads the body chunk by chunk; ``first_chunk`` is set when the first one arrived
  /cut                 sends a few bytes of a longer body, then drops the connection
  /status/<n>          answers status <n> (with a body, where the status has one)
  anything else        200, echoing the request body, with hop-by-hop and repeated headers in the answer

Each request is recorded with its method, path and query exactly as they came over the wire, its header
lines in order, and its body bytes.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from aiohttp import web

from tests.support.threaded import ThreadedServer

WAIT_S = 10  # how long a scripted step waits for the test before it gives up


@dataclass
class Seen:
    method: str
    path: str  # as sent: still percent-encoded
    query: str  # as sent, without the '?'
    headers: list[tuple[str, str]]
    body: bytes


class RawUpstream:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.first_chunk = threading.Event()
        self._release: asyncio.Event | None = None
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_route("*", "/stream", self.stream)
        app.router.add_route("*", "/upload", self.upload)
        app.router.add_route("*", "/cut", self.cut)
        app.router.add_route("*", "/status/{status}", self.status)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.server = ThreadedServer(app)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> RawUpstream:
        self.server.start()
        self._release = asyncio.run_coroutine_threadsafe(_event(), self.server.loop).result(5)
        return self

    def stop(self) -> None:
        self.server.stop()

    def release(self) -> None:
        """Let /stream send its second piece."""
        assert self._release is not None
        self.server.loop.call_soon_threadsafe(self._release.set)

    def last(self) -> Seen:
        return self.requests[-1]

    def _record(self, request: web.Request, body: bytes) -> Seen:
        path, _, query = request.raw_path.partition("?")
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers]
        seen = Seen(request.method, path, query, headers, body)
        self.requests.append(seen)
        return seen

    async def models(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        return web.json_response({"object": "list", "data": [{"id": "raw-model", "object": "model"}]})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record(request, body)
        response = web.Response(body=body, content_type=request.content_type or "application/octet-stream")
        response.headers["X-Upstream"] = "raw"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Authenticate"] = "Basic realm=upstream"
        response.headers["Upgrade"] = "h2c"
        response.headers["Connection"] = "keep-alive, X-Hop-Answer"
        response.headers["X-Hop-Answer"] = "for the hop only"
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._record(request, await request.read())
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first\n")
        assert self._release is not None
        await asyncio.wait_for(self._release.wait(), WAIT_S)
        self._release.clear()
        await response.write(b"second\n")
        await response.write_eof()
        return response

    async def upload(self, request: web.Request) -> web.Response:
        chunks = []
        async for chunk in request.content.iter_any():
            chunks.append(chunk)
            self.first_chunk.set()
        body = b"".join(chunks)
        self._record(request, body)
        self.first_chunk.clear()
        return web.json_response({"bytes": len(body)})

    async def cut(self, request: web.Request) -> web.StreamResponse:
        self._record(request, await request.read())
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"only part of it")  # handed to the socket: abort() keeps it
        assert request.transport is not None
        request.transport.abort()
        return response

    async def status(self, request: web.Request) -> web.Response:
        self._record(request, await request.read())
        status = int(request.match_info["status"])
        if status in (204, 304):
            return web.Response(status=status)
        return web.Response(status=status, text=f"status {status} from the backend")


async def _event() -> asyncio.Event:
    return asyncio.Event()  # made on the server's loop, where it is awaited
