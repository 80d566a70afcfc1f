"""The live state several appliances share, in Redis (or Valkey): the one seam to it.

Every worker of every node holds one connection. Callers change state with Lua scripts (``script``), so a
check-and-update is one round trip and atomic across nodes. A call never hangs a request: each is bounded by
``timeout_ms``, and after a failure Redis is taken as down for ``retry_s`` (calls fail at once meanwhile, so a
dead Redis costs no request a timeout). What a caller does then is its own policy (``[state] on_state_error``
for limits); here a failure is only ``StateUnavailable``, reported once per outage to ``on_error``.

The client is our own, over asyncio and hiredis's RESP parser: redis-py's asyncio client spent 150-230 us of CPU
per script call on this machine where this one spends 45-70 (tests/perf/README.md), and a request pays it once
per call. Redis answers a connection's commands in the order they were sent, so one connection carries every
coroutine of the worker: a command is written at once and its future is the next reply in line.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from appliance.common.config import StateSettings, masked_url
from appliance.common.errors import GatewayError

log = logging.getLogger("appliance.state")

Command = Sequence[Any]


class StateUnavailable(Exception):
    """Redis did not answer (down, unreachable, too slow, or refusing the call)."""


@dataclass(frozen=True)
class Script:
    lua: str
    sha: str


@dataclass(frozen=True)
class Address:
    """Where Redis is and how to log in: redis://[user:password@]host[:port][/db], rediss://, unix:///path?db=N."""

    host: str | None
    port: int
    path: str | None
    tls: bool
    username: str | None
    password: str | None
    db: int

    @classmethod
    def of(cls, url: str) -> Address:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.scheme == "unix":
            db = int(query.get("db", ["0"])[0])
            return cls(None, 0, unquote(parts.path), False, _user(parts.username), _secret(parts.password), db)
        db = int(parts.path.strip("/") or query.get("db", ["0"])[0])
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379, None, parts.scheme == "rediss",
                   _user(parts.username), _secret(parts.password), db)


def _user(value: str | None) -> str | None:
    return unquote(value) if value else None


def _secret(value: str | None) -> str | None:
    return unquote(value) if value is not None else None


class _Connection(asyncio.Protocol):
    """One socket to Redis: replies meet their futures in order. The commands of one turn of the event loop go
    out in one write (every request a worker resumes in that turn, each with its admit or settle), so Redis
    reads them, and answers them, at once: one send and one wake-up for all of them."""

    def __init__(self) -> None:
        import hiredis  # here: an appliance without [state] url never loads it

        self._reader = hiredis.Reader(replyError=ReplyError)
        self._pack = hiredis.pack_command
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter = self._waiting.popleft()
            if not waiter.done():  # one that timed out is still in line: its reply is dropped here
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = ConnectionError(f"connection to Redis lost: {exc}" if exc else "Redis closed the connection")
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._waiting.extend(futures)
        if not self._outgoing:
            loop.call_soon(self._write)
        self._outgoing.extend(self._pack(tuple(c)) for c in commands)
        return futures

    def _write(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(outgoing))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class SharedState:
    def __init__(self, settings: StateSettings, *, on_error: Callable[[str], None] = lambda _: None,
                 on_reconnect: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert settings.url is not None
        self.settings = settings
        self.prefix = settings.prefix
        self._address = Address.of(settings.url)
        self._timeout = settings.timeout_ms / 1000
        self._on_error = on_error
        # Called on every connection after the first: the Redis found may be a new one (restarted, maybe without
        # its data). The owner may set it once what it calls exists.
        self.on_reconnect = on_reconnect
        self._connected_before = False
        self._clock = clock
        self._down_until = 0.0
        self._down = False
        self._connection: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def connect(cls, settings: StateSettings, **kwargs: Any) -> SharedState:
        """A client for ``settings.url``; no connection is made until the first call."""
        return cls(settings, **kwargs)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @staticmethod
    def script(lua: str) -> Script:
        """A Lua script, sent by its SHA (and whole, once, to a Redis that does not know it yet)."""
        return Script(lua, hashlib.sha1(lua.encode()).hexdigest())

    @property
    def down(self) -> bool:
        """Taken as down: the last call failed less than ``retry_s`` ago (calls fail at once meanwhile)."""
        return self._down and self._clock() < self._down_until

    @property
    def unreachable(self) -> bool:
        """The outage, for /ready: from a failed call until a call succeeds again, ``retry_s`` windows or not."""
        return self._down

    # ---------------------------------------------------------------- calls

    async def command(self, *args: Any) -> Any:
        """One command's reply (bytes, int, list or None)."""
        return (await self.commands([args]))[0]

    async def commands(self, commands: Sequence[Command]) -> list[Any]:
        """Several commands in one round trip (a pipeline, not a transaction); replies in order."""
        replies = await self._exchange(commands)
        return [_checked(reply) for reply in replies]

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return (await self.run_all([(script, keys, args)]))[0]

    async def run_all(self, calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Several scripts in one round trip (each atomic alone), sent by SHA; those Redis does not know (it
        restarted, or it is the first call) are sent whole and run again, once."""
        replies = await self._exchange([("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in calls])
        missing = [i for i, reply in enumerate(replies) if _unknown_script(reply)]
        if missing:
            again = await self._exchange([("EVAL", calls[i][0].lua, len(calls[i][1]), *calls[i][1], *calls[i][2])
                                          for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return [_checked(reply) for reply in replies]

    async def _exchange(self, commands: Sequence[Command]) -> list[Any]:
        if self.down:
            raise StateUnavailable("Redis was unreachable moments ago")
        try:
            connection = self._connection if self._connection is not None and not self._connection.lost \
                else await self._connect()
            futures = connection.send(commands)
            timer = asyncio.get_running_loop().call_later(self._timeout, _expire, futures)
            try:
                replies = [await future for future in futures]
            finally:
                timer.cancel()
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError, _LoginRefused) as exc:
            self._failed(exc)
            raise StateUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if self._down:
            self._down = False
            log.warning("shared state at %s is reachable again", masked_url(self.settings.url))
        return replies

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # the first caller connects; the others wait for its connection
            if self._connection is not None and not self._connection.lost:
                return self._connection
            self._connection = await asyncio.wait_for(self._open(), self._timeout)
            if self._connected_before:
                self.on_reconnect()
            self._connected_before = True
            return self._connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self._address
        if address.path is not None:
            _, connection = await loop.create_unix_connection(_Connection, address.path)
        else:
            context = ssl.create_default_context() if address.tls else None
            _, connection = await loop.create_connection(_Connection, address.host, address.port, ssl=context)
        hello: list[Command] = []
        if address.password is not None:
            hello.append(("AUTH", address.username, address.password) if address.username
                         else ("AUTH", address.password))
        if address.db:
            hello.append(("SELECT", address.db))
        if hello:
            for reply in await asyncio.gather(*connection.send(hello)):
                if isinstance(reply, ReplyError):
                    connection.close()
                    raise _LoginRefused(str(reply))
        return connection

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self.settings.retry_s
        if self._connection is not None:  # replies may never come on it: start again on a new one
            self._connection.close()
            self._connection = None
        if not self._down:
            log.warning("shared state at %s unreachable (%s: %s); on_state_error=%s", masked_url(self.settings.url),
                        type(exc).__name__, exc, self.settings.on_state_error)
        self._down = True
        self._on_error(type(exc).__name__)

    def refusal(self, what: str) -> GatewayError:
        """The 503 ``state_unavailable`` for what a request needed of the shared state and could not have;
        Retry-After is when Redis will be tried again (``retry_s``)."""
        wait = max(1, math.ceil(self.settings.retry_s))
        return GatewayError("state_unavailable", f"{what} the gateway's shared state, unreachable right now; try "
                            "again shortly.", headers={"Retry-After": str(wait)}, extra={"retry_after": wait})

    async def describe(self) -> str:
        """What check-config says it found: the server and its version."""
        text = (await self.command("INFO", "server")).decode()
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        name = "Valkey" if "valkey_version" in info else "Redis"
        return f"{name} {info.get('valkey_version') or info.get('redis_version')}"

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class ReplyError(Exception):
    """An error reply from Redis (what hiredis's parser makes of one)."""


class _LoginRefused(Exception):
    """AUTH or SELECT was refused: a wrong password or database number."""


class ScriptError(StateUnavailable):
    """Redis refused a command or a script failed: a bug of ours, not an outage (logged as an error)."""


def _expire(futures: list[asyncio.Future[Any]]) -> None:
    """The call's time is up: whatever has no reply yet fails (its reply, if it comes, is dropped)."""
    for future in futures:
        if not future.done():
            future.set_exception(TimeoutError("Redis did not answer in time"))


def _unknown_script(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


def _checked(reply: Any) -> Any:
    if isinstance(reply, ReplyError):
        log.error("Redis refused a call: %s", reply)
        raise ScriptError(str(reply))
    return reply
