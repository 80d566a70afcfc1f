#!/usr/bin/env python3
"""redis-py's asyncio client against storage/state.SharedState (our own, on hiredis) on the calls the appliance
makes: CPU microseconds per Lua script call (the limit check) and per GET (a cache lookup).

Why storage/state.py has its own client (tests/perf/README.md has the figures). Not a test; redis-py is not a
dependency, so run it from a venv that has it beside the appliance's own:

    python3.11 -m venv /tmp/redisvenv && /tmp/redisvenv/bin/pip install -e . redis
    /tmp/redisvenv/bin/python tests/perf/redis_client.py --rounds 3

It starts its own Redis (tests/support/engines.py).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.common.config import StateSettings
from appliance.storage.state import SharedState
from tests.support.engines import start_redis

LUA = "local v = redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], 60); return {v, ARGV[1]}"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def with_redis_py(url: str, n: int) -> dict[str, float]:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    script = client.register_script(LUA)
    await script(keys=["k"], args=["x"])
    await client.set("g", b"v" * 200)
    started = cpu()
    for _ in range(n):
        await script(keys=["k"], args=["x" * 40])
    per_script = (cpu() - started) / n * 1e6
    started = cpu()
    for _ in range(n):
        await client.get("g")
    per_get = (cpu() - started) / n * 1e6
    await client.aclose()
    return {"script_us": per_script, "get_us": per_get}


async def with_ours(url: str, n: int) -> dict[str, float]:
    state = SharedState.connect(StateSettings(url=url))
    script = state.script(LUA)
    await state.run(script, ["k"], ["x"])
    await state.command("SET", "g", b"v" * 200)
    started = cpu()
    for _ in range(n):
        await state.run(script, ["k"], ["x" * 40])
    per_script = (cpu() - started) / n * 1e6
    started = cpu()
    for _ in range(n):
        await state.command("GET", "g")
    per_get = (cpu() - started) / n * 1e6
    await state.close()
    return {"script_us": per_script, "get_us": per_get}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=5000)
    a = ap.parse_args()
    engine = start_redis(Path(tempfile.mkdtemp(prefix="redis-client-")))
    try:
        for rnd in range(a.rounds):
            for name, bench in (("redis-py", with_redis_py), ("ours", with_ours)):
                figures = asyncio.run(bench(engine.url, a.n))
                print(f"round {rnd} {name:<8} " + "  ".join(f"{k}={v:.0f}" for k, v in figures.items()), flush=True)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
