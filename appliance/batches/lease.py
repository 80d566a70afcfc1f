"""The batch runner's lease: one holder across the workers (database) or across every node (Redis).

Owners are unique per node and worker (pid plus random bytes), so a holder only ever renews or releases its
own lease. In Redis the lease is one key holding ``owner|expires_at``, taken when free or expired (as SET NX
would) and renewed only by its owner, both by one Lua compare-and-set; its PX expiry lets a dead node's lease
go. The expiry in the value follows the runner's clock (injectable), as the database lease does.
Nothing clears a Redis lease at start: a node starting must not take the lease of another that still runs.

The lease goes to Redis only when the batches it guards are shared too (``[database] url``): nodes that each
keep their batches in their own SQLite each need their own runner, so each keeps its own lease there.
"""

from __future__ import annotations

from typing import Protocol

from appliance.common.config import Settings
from appliance.storage import batches_repo
from appliance.storage.db import Database
from appliance.storage.state import SharedState

# KEYS: the lease. ARGV: owner, now, expires_at, ttl_ms. 1 when the owner holds it after the call.
_TAKE = """
local held = redis.call('GET', KEYS[1])
if held then
  local owner, expires = string.match(held, '^(.*)|([^|]*)$')
  if owner ~= ARGV[1] and tonumber(expires) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[4])
return 1
"""
# KEYS: the lease. ARGV: owner. Deleted only by its owner.
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and string.match(held, '^(.*)|') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease(Protocol):
    async def take(self, owner: str, now: float, ttl_s: float) -> bool:
        """Take or renew the lease; True while ``owner`` holds it (StateUnavailable when Redis cannot say)."""
        ...

    async def release(self, owner: str) -> None: ...


class DatabaseLease:
    """The lease in the database: the workers of one appliance."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def take(self, owner: str, now: float, ttl_s: float) -> bool:
        return await batches_repo.take_lease(self._db, owner, now, ttl_s)

    async def release(self, owner: str) -> None:
        await batches_repo.release_lease(self._db, owner)


class SharedLease:
    """The lease in Redis: every worker of every node sharing ``[state] url``."""

    def __init__(self, state: SharedState, name: str = batches_repo.RUNNER) -> None:
        self._state = state
        self._key = state.key("lease", name)
        self._take = state.script(_TAKE)
        self._release = state.script(_RELEASE)

    async def take(self, owner: str, now: float, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(await self._state.run(self._take, [self._key], [owner, repr(now), repr(now + ttl_s), ttl_ms]))

    async def release(self, owner: str) -> None:
        await self._state.run(self._release, [self._key], [owner])


def shared(settings: Settings) -> bool:
    """Is the lease in Redis: shared state, and batches every node sees?"""
    return settings.state.url is not None and settings.database.url is not None


def lease_for(settings: Settings, db: Database, state: SharedState | None) -> Lease:
    return SharedLease(state) if state is not None and shared(settings) else DatabaseLease(db)
