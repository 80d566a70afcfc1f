"""The response cache's exact-match entries in Redis, when several appliances share ``[state] url``.

An entry is one string (a small JSON header, a newline, the answer's bytes) under ``cache:e:<key>``, set with
the entry's TTL, so a lookup is one GET. The size cap is kept by the Lua script that stores: every entry is
also in a sorted set by its expiry time, with its size in a hash and the total in a counter; past ``max_mb``
the entries that expire soonest go first (the already expired ones before any other). Eviction is thus by
expiry, not by last use: Redis counts no hits per entry, so every hit stays a single GET.

A Redis failure is a miss (or a skipped store), never an error: the cache only ever saves work.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import orjson

from appliance.storage.state import SharedState, StateUnavailable

log = logging.getLogger("appliance.core.cache")

# Bytes an entry costs beyond its body (its key three times, header, index entries), as cache_repo counts rows.
ENTRY_OVERHEAD = 256
# Expired index entries one store removes at most (the rest go with the next stores).
_PURGE_BATCH = 64

# KEYS: entry, index (zset member -> expires_at), sizes (hash member -> bytes), total (bytes).
# ARGV: member, value, ttl_ms, expires_at, size, max_bytes, now, entry key prefix, expired ones to purge.
_PUT = """
local member, size, max_bytes, now = ARGV[1], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local function drop(name)
  local was = tonumber(redis.call('HGET', KEYS[3], name) or '0')
  redis.call('HDEL', KEYS[3], name)
  redis.call('ZREM', KEYS[2], name)
  if was > 0 then redis.call('DECRBY', KEYS[4], was) end
  return was
end
drop(member)
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[9]))) do
  drop(name)
  redis.call('DEL', ARGV[8] .. name)
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], member)
redis.call('HSET', KEYS[3], member, size)
local total = redis.call('INCRBY', KEYS[4], size)
local evicted = 0
while total > max_bytes do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then break end
  drop(first[1])
  redis.call('DEL', ARGV[8] .. first[1])
  total = tonumber(redis.call('GET', KEYS[4]) or '0')
  evicted = evicted + 1
end
return evicted
"""


class Entry(NamedTuple):
    body: bytes
    created_at: float
    expires_at: float
    prompt: int | None
    completion: int | None
    estimated: bool


class SharedCache:
    """Exact-match cache entries every node sees (one GET to look up, one script to store)."""

    def __init__(self, state: SharedState) -> None:
        self._state = state
        self._put = state.script(_PUT)
        self._entry_prefix = state.key("cache", "e", "")
        self._index = state.key("cache", "index")
        self._sizes = state.key("cache", "sizes")
        self._total = state.key("cache", "bytes")

    async def get(self, key: str) -> Entry | None:
        """The live entry under ``key``; None when there is none or Redis cannot be asked (a miss)."""
        try:
            raw = await self._state.command("GET", self._entry_prefix + key)
        except StateUnavailable:
            return None
        if raw is None:
            return None
        header, _, body = bytes(raw).partition(b"\n")
        try:
            created_at, expires_at, prompt, completion, estimated = orjson.loads(header)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.warning("unreadable shared cache entry %s: answering as a miss", key)
            return None
        return Entry(body, created_at, expires_at, prompt, completion, bool(estimated))

    async def put(self, key: str, entry: Entry, max_bytes: int) -> bool:
        """Store ``entry`` until it expires; False when Redis cannot be reached (the answer is simply not shared)."""
        ttl_ms = int((entry.expires_at - entry.created_at) * 1000)
        if ttl_ms <= 0:
            return False
        header = orjson.dumps([entry.created_at, entry.expires_at, entry.prompt, entry.completion, entry.estimated])
        value = header + b"\n" + entry.body
        size = len(value) + ENTRY_OVERHEAD
        try:
            await self._state.run(self._put, [self._entry_prefix + key, self._index, self._sizes, self._total],
                                  [key, value, ttl_ms, entry.expires_at, size, max_bytes, entry.created_at,
                                   self._entry_prefix, _PURGE_BATCH])
        except StateUnavailable:
            return False
        return True
