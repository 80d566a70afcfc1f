"""The live state several appliances share, in Redis (or Valkey): the one seam to it.

Every worker of every node holds one connection pool. Callers change state with Lua scripts (``script``), so a
check-and-update is one round trip and atomic across nodes. A call never hangs a request: each is bounded by
``timeout_ms``, and after a failure Redis is taken as down for ``retry_s`` (calls fail at once meanwhile, so a
dead Redis costs no request a timeout). What a caller does then is its own policy (``[state] on_state_error``
for limits); here a failure is only ``StateUnavailable``, reported once per outage to ``on_error``.

redis-py is imported only when a URL is configured: a single appliance never loads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from appliance.common.config import StateSettings, masked_url

log = logging.getLogger("appliance.state")

T = TypeVar("T")


class StateUnavailable(Exception):
    """Redis did not answer (down, unreachable, too slow, or refusing the call)."""


class SharedState:
    def __init__(self, client: Any, settings: StateSettings, *, on_error: Callable[[str], None] = lambda _: None,
                 on_recover: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.settings = settings
        self.prefix = settings.prefix
        self._on_error = on_error
        self._on_recover = on_recover
        self._clock = clock
        self._down_until = 0.0
        self._down = False

    @classmethod
    def connect(cls, settings: StateSettings, **kwargs: Any) -> SharedState:
        """A client for ``settings.url``; no connection is made until the first call."""
        import redis.asyncio as redis

        timeout = settings.timeout_ms / 1000
        client = redis.Redis.from_url(settings.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                      retry_on_timeout=False, health_check_interval=30)
        return cls(client, settings, **kwargs)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def script(self, lua: str) -> Any:
        """A Lua script, sent by its SHA (loaded again by redis-py when the server has forgotten it)."""
        return self.client.register_script(lua)

    @property
    def down(self) -> bool:
        """Taken as down: the last call failed less than ``retry_s`` ago."""
        return self._down and self._clock() < self._down_until

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call; any failure becomes StateUnavailable (at once while Redis is taken as down)."""
        if self.down:
            raise StateUnavailable("Redis was unreachable moments ago")
        from redis.exceptions import RedisError

        try:
            result = await make()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise StateUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if self._down:
            self._down = False
            log.warning("shared state at %s is reachable again", masked_url(self.settings.url))
            self._on_recover()
        return result

    async def run(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.call(lambda: script(keys=list(keys), args=list(args)))

    async def run_all(self, calls: Sequence[tuple[Any, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Several scripts in one round trip: a pipeline, not a transaction (each script is atomic alone).

        Sent by SHA alone (redis-py's scripts in a pipeline would ask SCRIPT EXISTS first: a second round trip
        each time); those a restarted Redis no longer knows are loaded and run again, once.
        """
        from redis.exceptions import NoScriptError

        async def send() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            for i, result in enumerate(results):
                if isinstance(result, NoScriptError):  # it did not run: run it now, loading it
                    script, keys, args = calls[i]
                    results[i] = await script(keys=list(keys), args=list(args))
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return results

        return await self.call(send)

    async def pipeline(self, fill: Callable[[Any], None]) -> list[Any]:
        """Plain commands in one round trip: ``fill`` queues them on the pipeline it is handed."""
        async def send() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                fill(pipe)
                return await pipe.execute()

        return await self.call(send)

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self.settings.retry_s
        if not self._down:
            log.warning("shared state at %s unreachable (%s: %s); on_state_error=%s", masked_url(self.settings.url),
                        type(exc).__name__, exc, self.settings.on_state_error)
        self._down = True
        self._on_error(type(exc).__name__)

    async def describe(self) -> str:
        """What check-config says it found: the server and its version."""
        info = await self.call(lambda: self.client.info("server"))
        name = "Valkey" if info.get("valkey_version") else "Redis"
        return f"{name} {info.get('valkey_version') or info.get('redis_version')}"

    async def close(self) -> None:
        await self.client.aclose()
