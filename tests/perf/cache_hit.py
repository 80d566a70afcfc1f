#!/usr/bin/env python3
"""CPU of the cache's hit path, in-process: decide() + cache_key() + ResponseCache.get().

Target: under 0.3 ms per memory hit. Measured with time.process_time (every thread of the process, so
the aiosqlite thread of a SQLite hit counts too) over --iterations hits, after a warm-up.

  /tmp/devenv/bin/python tests/perf/cache_hit.py [--iterations 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.accounts.usage import Tokens
from appliance.common.config import CacheSettings
from appliance.common.resources import migrations_dir
from appliance.core.cache import ResponseCache, cache_key, decide
from appliance.storage.db import Database
from appliance.storage.migrate import migrate
from appliance.storage.writer import BufferedWriter

# A typical small chat request (~1 KB) and its answer.
BODY = orjson.loads(orjson.dumps({
    "model": "llama-3.1-8b", "temperature": 0, "max_tokens": 256, "user": "u-42",
    "messages": [{"role": "system", "content": "You are a concise assistant. " * 8},
                 {"role": "user", "content": "Summarise the water cycle in three sentences. " * 8}],
}))
ANSWER = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "llama-3.1-8b",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Water evaporates, condenses, falls. " * 6},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 160, "completion_tokens": 60, "total_tokens": 220},
})
HEADERS = {"x-appliance-request-tag": "bench"}


async def measure(cache: ResponseCache, settings: CacheSettings, iterations: int) -> dict[str, float]:
    served, scope = "llamacpp/llama-3.1-8b", "key_0123456789abcdef"

    async def one() -> None:
        decision = decide("chat/completions", BODY, HEADERS, settings)
        assert decision.cacheable and not decision.bypass
        key = cache_key("chat/completions", BODY, served, scope)
        hit = await cache.get(key)
        assert hit is not None

    for _ in range(min(iterations, 2000)):  # warm-up
        await one()
    started = time.process_time()
    for _ in range(iterations):
        await one()
    total = time.process_time() - started

    parts: dict[str, float] = {}
    started = time.process_time()
    for _ in range(iterations):
        decide("chat/completions", BODY, HEADERS, settings)
    parts["decide"] = time.process_time() - started
    started = time.process_time()
    for _ in range(iterations):
        cache_key("chat/completions", BODY, served, scope)
    parts["cache_key"] = time.process_time() - started
    key = cache_key("chat/completions", BODY, served, scope)
    started = time.process_time()
    for _ in range(iterations):
        await cache.get(key)
    parts["get"] = time.process_time() - started
    return {"total": total, **parts}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "appliance.db"
        migrate(path, migrations_dir())
        db = await Database.open(path)
        writer = BufferedWriter(db, 0.25)
        try:
            for label, memory_entries, iterations in (("memory hit", 1024, args.iterations),
                                                      ("SQLite hit", 0, max(args.iterations // 4, 1))):
                settings = CacheSettings(memory_entries=memory_entries)
                cache = ResponseCache(db, writer, settings)
                key = cache_key("chat/completions", BODY, "llamacpp/llama-3.1-8b", "key_0123456789abcdef")
                await cache.put(key, endpoint="chat/completions", scope="key_0123456789abcdef",
                                served="llamacpp/llama-3.1-8b", body=ANSWER, tokens=Tokens(160, 60), ttl_s=3600)
                result = await measure(cache, settings, iterations)
                await writer.flush()  # the buffered hit counts, outside the timed loops
                per = {name: seconds / iterations * 1e6 for name, seconds in result.items()}
                print(f"{label}: {per['total']:.1f} µs per hit over {iterations} "
                      f"(decide {per['decide']:.1f}, cache_key {per['cache_key']:.1f}, get {per['get']:.1f} µs)")
        finally:
            await writer.stop()
            await db.close()


if __name__ == "__main__":
    asyncio.run(main())
