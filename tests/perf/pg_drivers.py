#!/usr/bin/env python3
"""psycopg 3 (+ psycopg-pool) against asyncpg on the statements the appliance sends PostgreSQL: CPU ms per call.

Why storage/pg.py uses asyncpg (tests/perf/README.md has the figures). Not a test; psycopg is not a dependency,
so run it from a venv that has both drivers:

    python3.11 -m venv /tmp/pgvenv && /tmp/pgvenv/bin/pip install asyncpg 'psycopg[binary]' psycopg-pool aiohttp
    /tmp/pgvenv/bin/python tests/perf/pg_drivers.py --rounds 3

It starts its own PostgreSQL (tests/support/engines.py) and, per round and driver, times N lookups of a key by
its hash (a worker's auth-cache miss) and N ledger rows inserted 50 to a transaction (the buffered writer).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.engines import create_database, start_postgres

SCHEMA = ("CREATE TABLE IF NOT EXISTS k (hash TEXT PRIMARY KEY, name TEXT, n BIGINT)",
          "CREATE TABLE IF NOT EXISTS led (id TEXT PRIMARY KEY, key TEXT, tokens BIGINT, cost DOUBLE PRECISION)",
          "INSERT INTO k VALUES ('h1', 'one', 1) ON CONFLICT DO NOTHING")


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def with_psycopg(url: str, n: int, tag: str) -> dict[str, float]:
    import psycopg_pool

    pool = psycopg_pool.AsyncConnectionPool(url, min_size=2, max_size=2, open=False, kwargs={"autocommit": True})
    await pool.open()
    async with pool.connection() as conn:
        for statement in SCHEMA:
            await conn.execute(statement)
    started = cpu()
    for _ in range(n):
        async with pool.connection() as conn:
            await (await conn.execute("SELECT * FROM k WHERE hash = %s", ("h1",))).fetchall()
    lookup = (cpu() - started) / n * 1000
    started = cpu()
    for i in range(n // 50):
        async with pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany("INSERT INTO led VALUES (%s, %s, %s, %s)",
                                     [(f"{tag}-{i}-{j}", "k", 10, 0.1) for j in range(50)])
    insert = (cpu() - started) / n * 1000
    await pool.close()
    return {"lookup_ms": lookup, "insert_ms_per_row": insert}


async def with_asyncpg(url: str, n: int, tag: str) -> dict[str, float]:
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=2, max_size=2)
    async with pool.acquire() as conn:
        for statement in SCHEMA:
            await conn.execute(statement)
    started = cpu()
    for _ in range(n):
        async with pool.acquire() as conn:
            await conn.fetch("SELECT * FROM k WHERE hash = $1", "h1")
    lookup = (cpu() - started) / n * 1000
    started = cpu()
    for i in range(n // 50):
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany("INSERT INTO led VALUES ($1, $2, $3, $4)",
                                   [(f"{tag}-{i}-{j}", "k", 10, 0.1) for j in range(50)])
    insert = (cpu() - started) / n * 1000
    await pool.close()
    return {"lookup_ms": lookup, "insert_ms_per_row": insert}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=3000)
    a = ap.parse_args()
    engine = start_postgres(Path(tempfile.mkdtemp(prefix="pg-drivers-")))
    try:
        url = create_database(engine, "drivers")
        for rnd in range(a.rounds):
            for name, bench in (("psycopg", with_psycopg), ("asyncpg", with_asyncpg)):
                figures = asyncio.run(bench(url, a.n, f"{name}{rnd}"))
                print(f"round {rnd} {name:<8} " + "  ".join(f"{k}={v:.4f}" for k, v in figures.items()), flush=True)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
