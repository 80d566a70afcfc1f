"""The ledger: one entry per request the gateway accounted for, and every table an entry feeds.

An entry is the request-log row and, with ``[log] store_bodies``, its bodies. The daily usage rollup and
the per-minute traffic follow from the row alone, so an entry replayed from a worker's journal (see
journal.py) counts exactly as it would have the first time, and nothing but the row needs journaling.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import aiosqlite
import orjson

from appliance.storage.requests_repo import INSERT as INSERT_REQUEST
from appliance.storage.requests_repo import INSERT_BODIES, RequestRecord
from appliance.storage.stats_repo import TRAFFIC
from appliance.storage.usage_repo import ROLLUP, day_of

# The request log's cache outcomes that no backend answered.
CACHE_HITS = frozenset(("HIT", "HIT-SEMANTIC"))


class Bodies(NamedTuple):
    request: bytes | None
    response: bytes | None
    truncated: bool


class Entry(NamedTuple):
    row: RequestRecord
    bodies: Bodies | None = None


def bodies_of(request: bytes | None, response: bytes | None, max_bytes: int) -> Bodies:
    """A request's bodies, each cut to ``max_bytes``."""
    cut = any(b is not None and len(b) > max_bytes for b in (request, response))
    return Bodies(request[:max_bytes] if request is not None else None,
                  response[:max_bytes] if response is not None else None, cut)


# ------------------------------------------------------------------------------------------ journal lines


def encode(seq: int, entry: Entry) -> bytes:
    """One journal line: ``[seq, row..., bodies or null]`` and a newline."""
    bodies = entry.bodies
    packed = None if bodies is None else [_b64(bodies.request), _b64(bodies.response), bodies.truncated]
    return orjson.dumps([seq, *entry.row, packed]) + b"\n"


def decode(line: bytes) -> tuple[int, Entry]:
    """The sequence number and entry of a journal line (ValueError when it is not one)."""
    try:
        seq, *fields, packed = orjson.loads(line)
        row = RequestRecord(*fields)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a journal line: {exc}") from None
    bodies = None if packed is None else Bodies(_unb64(packed[0]), _unb64(packed[1]), bool(packed[2]))
    return int(seq), Entry(row, bodies)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


# ------------------------------------------------------------------------------------------ writing


async def apply(conn: aiosqlite.Connection, entries: Sequence[Entry]) -> None:
    """Write ``entries`` and what they add to the rollups (inside the caller's transaction)."""
    await conn.executemany(INSERT_REQUEST, [entry.row for entry in entries])
    bodies = [(e.row.request_id, e.row.created_at, *e.bodies) for e in entries if e.bodies is not None]
    if bodies:
        await conn.executemany(INSERT_BODIES, bodies)
    usage, traffic = _rollups(entry.row for entry in entries)
    await conn.executemany(ROLLUP, [(*key, *totals) for key, totals in usage.items()])
    await conn.executemany(TRAFFIC, [(*key, *totals) for key, totals in traffic.items()])


def _rollups(rows: Iterable[RequestRecord]) -> tuple[dict[tuple[Any, ...], list[float]], dict[tuple[Any, ...],
                                                                                                  list[float]]]:
    """Summed per key: a thousand requests to one model in a flush become one upsert per table."""
    usage: dict[tuple[Any, ...], list[float]] = {}
    traffic: dict[tuple[Any, ...], list[float]] = {}
    for row in rows:
        failed = row.status >= 400 or row.error_code is not None
        prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
        if row.key_id is not None:  # the usage ledger covers requests made with a key
            _add(usage, (day_of(row.created_at), row.key_id, row.model or "", row.backend or "",
                         row.backend_model or ""),
                 (1, int(failed), prompt, completion, row.cached_tokens or 0, row.cost_usd or 0.0,
                  int(row.cache in CACHE_HITS), row.compute_cost_usd or 0.0))
        # The status page's traffic: every request, and per backend the ones it was asked to answer.
        minute = int(row.created_at // 60)
        _add(traffic, (minute, ""), (1, int(failed), prompt + completion))
        if row.backend is not None and row.cache not in CACHE_HITS and row.status != 429:
            _add(traffic, (minute, row.backend), (1, int(failed), prompt + completion))
    return usage, traffic


def _add(sums: dict[tuple[Any, ...], list[float]], key: tuple[Any, ...], values: tuple[float, ...]) -> None:
    totals = sums.get(key)
    if totals is None:
        sums[key] = list(values)
    else:
        for i, value in enumerate(values):
            totals[i] += value


# ------------------------------------------------------------------------------------------ journal progress


async def progress(conn: aiosqlite.Connection, owner: str) -> int:
    """The highest sequence number of ``owner``'s journal already in the database (0: none)."""
    rows = list(await conn.execute_fetchall("SELECT seq FROM journal_progress WHERE owner = ?", (owner,)))
    return int(rows[0][0]) if rows else 0


async def set_progress(conn: aiosqlite.Connection, owner: str, seq: int) -> None:
    await conn.execute("INSERT INTO journal_progress (owner, seq) VALUES (?, ?) "
                       "ON CONFLICT (owner) DO UPDATE SET seq = excluded.seq", (owner, seq))


async def forget(conn: aiosqlite.Connection, owner: str) -> None:
    """``owner``'s journal is gone: its progress row is not needed any more."""
    await conn.execute("DELETE FROM journal_progress WHERE owner = ?", (owner,))
