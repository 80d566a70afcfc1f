"""storage/state.SharedState, the appliance's own Redis client, against a real Redis (and a silent socket)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.common.config import StateSettings
from appliance.storage.state import Address, ScriptError, SharedState, StateUnavailable
from tests.support.engines import Engine, start_redis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_for(url: str, **settings: object) -> SharedState:
    return SharedState.connect(StateSettings(url=url, prefix=f"t{uuid.uuid4().hex[:6]}:", **settings))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Engine]:
    try:
        engine = start_redis(tmp_path / "redis")
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    yield engine
    engine.stop()


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6380/2", Address("127.0.0.1", 6380, None, False, None, None, 2)),
    ("redis://:s%40cret@cache", Address("cache", 6379, None, False, None, "s@cret", 0)),
    ("rediss://app:pw@cache:6390/0", Address("cache", 6390, None, True, "app", "pw", 0)),
    ("unix:///run/redis.sock?db=3", Address(None, 0, "/run/redis.sock", False, None, None, 3)),
])
def test_urls_say_where_and_how_to_log_in(url: str, expected: Address) -> None:
    assert Address.of(url) == expected


def test_commands_scripts_and_many_callers_at_once(redis_engine: Engine) -> None:
    async def main() -> None:
        state = state_for(redis_engine.url)
        counter = state.script("return redis.call('INCR', KEYS[1])")
        key = state.key("n")
        replies = await asyncio.gather(*[state.run(counter, [key], []) for _ in range(200)])
        assert sorted(replies) == list(range(1, 201))  # each caller got its own reply, in the order Redis gave
        assert await state.commands([("SET", state.key("a"), b"\x00v", "PX", 5000), ("GET", state.key("a")),
                                     ("GET", state.key("none"))]) == [b"OK", b"\x00v", None]
        assert (await state.describe()).startswith(("Redis ", "Valkey "))
        await state.close()

    asyncio.run(main())


def test_a_script_redis_forgot_is_sent_whole_again(redis_engine: Engine) -> None:
    async def main() -> None:
        state = state_for(redis_engine.url)
        echo = state.script("return ARGV[1]")
        assert await state.run(echo, [], ["one"]) == b"one"
        await state.command("SCRIPT", "FLUSH")
        assert await state.run_all([(echo, [], ["two"]), (echo, [], ["three"])]) == [b"two", b"three"]
        await state.close()

    asyncio.run(main())


def test_a_refused_call_is_a_script_error_not_an_outage(redis_engine: Engine) -> None:
    async def main() -> None:
        state = state_for(redis_engine.url)
        await state.command("SET", state.key("s"), "text")
        with pytest.raises(ScriptError, match="not an integer"):
            await state.run(state.script("return redis.call('INCR', KEYS[1])"), [state.key("s")], [])
        assert not state.down
        await state.close()

    asyncio.run(main())


def test_password_and_database_from_the_url(own_redis: Engine) -> None:
    async def main() -> None:
        open_state = state_for(own_redis.url)
        await open_state.command("CONFIG", "SET", "requirepass", "pw")
        await open_state.close()
        state = state_for(f"redis://:pw@127.0.0.1:{own_redis.port}/5")
        await state.command("SET", "k", "in five")
        assert await state.command("GET", "k") == b"in five"
        other = state_for(f"redis://:pw@127.0.0.1:{own_redis.port}/0")
        assert await other.command("GET", "k") is None
        wrong = state_for(f"redis://:nope@127.0.0.1:{own_redis.port}/0")
        with pytest.raises(StateUnavailable):
            await wrong.command("GET", "k")
        for s in (state, other, wrong):
            await s.close()

    asyncio.run(main())


def test_a_silent_redis_costs_a_call_its_timeout_then_nothing_until_retry(own_redis: Engine) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    clock = Clock()

    async def main() -> None:
        state = SharedState(StateSettings(url=f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout_ms=50,
                                          retry_s=5), clock=clock)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StateUnavailable, match="in time"):
            await state.command("GET", "k")
        assert loop.time() - started < 2 and state.down
        started = loop.time()
        with pytest.raises(StateUnavailable, match="moments ago"):
            await state.command("GET", "k")
        assert loop.time() - started < 0.01  # taken as down: no wait at all
        clock.now += 6
        assert not state.down and state.unreachable  # tried again at the next call; still out until one succeeds
        await state.close()

    try:
        asyncio.run(main())
    finally:
        silent.close()


def test_a_restarted_redis_is_found_again(own_redis: Engine) -> None:
    clock = Clock()
    errors: list[str] = []

    async def main() -> None:
        state = SharedState(StateSettings(url=own_redis.url, retry_s=1), clock=clock, on_error=errors.append)
        assert await state.command("PING") == b"PONG"
        own_redis.kill()
        with pytest.raises(StateUnavailable):
            await state.command("PING")
        own_redis.start()
        clock.now += 2
        assert state.unreachable
        assert await state.command("PING") == b"PONG"
        assert not state.down and not state.unreachable and errors
        await state.close()

    asyncio.run(main())


def test_an_appliance_without_engines_never_loads_their_clients() -> None:
    """Unset [state] and [database]: the server imports neither hiredis nor asyncpg (their import time is
    not paid by a single appliance)."""
    code = ("import sys, appliance.server.app, appliance.server.lifecycle, appliance.server.runner; "
            "print(sorted(m for m in ('hiredis', 'asyncpg') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
