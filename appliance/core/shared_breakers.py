"""Circuit breakers and backend load shared by several appliances through ``[state] url`` (Redis).

The local table (resilience.BackendTable) stays the fast path: ``allow``, ``begin`` and ``end`` make no
Redis round trip. What crosses nodes:

- A breaker that opens or closes here is written at once (a Lua script bumps its version in one hash,
  field = the row's tag); every worker reads that hash every ``interval_s`` and takes any newer version
  into its node's table. So a breaker opened by node A's failures is open on node B a poll later. Failures
  are counted per node; the state they lead to is shared.
- Half-open trials: while Redis answers, ``allow`` grants none itself; the poll, on finding a breaker
  past its cooldown, takes the trial key with SET NX PX cooldown, and only its winner's node moves to
  half-open. One trial across the nodes; a trial that never reports frees the key after a cooldown.
- Requests in flight: each poll writes this node's counts per row (field ``node|tag``, with an expiry a few
  polls away, so a dead node's counts drop out) and reads the others', summed into ``remote_inflight``
  for least_busy routing and /v1/providers. The fair admission queue stays per node.

While Redis is down every node goes on with its own breakers (trials granted locally again) and its own
counts; nothing waits on Redis. States converge at the next change after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from appliance.core.resilience import CLOSED, HALF_OPEN, OPEN, Breakers
from appliance.storage.state import SharedState, StateUnavailable

log = logging.getLogger("appliance.core.shared_breakers")

POLL_S = 0.25
_EXPIRY_POLLS = 8  # this node's counts outlive it by this many polls

# KEYS: breakers hash, trial key. ARGV: tag, state, opened_at. Returns the new version: Redis's clock in
# microseconds (past the previous version), so a Redis that restarted empty does not hand out versions the
# nodes have seen already.
_CHANGE = """
local time = redis.call('TIME')
local version = tonumber(time[1]) * 1000000 + tonumber(time[2])
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  local previous = tonumber(string.match(held, '^(%d+)|'))
  if previous >= version then version = previous + 1 end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', version) .. '|' .. ARGV[2] .. '|' .. ARGV[3])
redis.call('DEL', KEYS[2])
return version
"""
# KEYS: in-flight hash, breakers hash. ARGV: node, ttl_ms, then tag, count pairs (this node's rows).
# Returns {the other nodes' live tag, count pairs; the breakers hash}. Expired fields (dead nodes) go.
_SYNC = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expires = string.format('%d', now + tonumber(ARGV[2]))
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[1] .. '|' .. ARGV[i], ARGV[i + 1] .. '|' .. expires)
end
local others = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local node, tag = string.match(all[i], '^(.*)|([^|]*)$')
  local count, until_ms = string.match(all[i + 1], '^(-?%d+)|(%d+)$')
  if tonumber(until_ms) < now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif node ~= ARGV[1] and tonumber(count) > 0 then
    others[#others + 1] = tag
    others[#others + 1] = count
  end
end
return {others, redis.call('HGETALL', KEYS[2])}
"""


class BreakerSync:
    """One worker's link between its node's breaker table and the shared state."""

    def __init__(self, state: SharedState, breakers: Breakers, node: str, *, interval_s: float = POLL_S) -> None:
        self._state = state
        self._breakers = breakers
        self._node = node
        self._interval_s = interval_s
        self._hash = state.key("breakers")
        self._load = state.key("inflight")
        self._change = state.script(_CHANGE)
        self._sync = state.script(_SYNC)
        self._pending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def attach(self) -> None:
        """Hook into the breakers: changes are written when they happen, trials granted by the poll."""
        self._breakers.on_change = self._changed
        self._breakers.trial_gate = lambda: not self._state.down

    def start(self) -> None:
        self.attach()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="breaker-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.published()

    async def published(self) -> None:
        """Wait for the changes written so far (stop; tests)."""
        for task in list(self._pending):
            with contextlib.suppress(Exception):
                await task

    # ------------------------------------------------------------------ changes made here

    def _changed(self, tag: int, state: int, opened_at: float) -> None:
        task = asyncio.get_running_loop().create_task(self.publish(tag, state, opened_at))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def publish(self, tag: int, state: int, opened_at: float) -> None:
        """Write a change of state; the version it gets is this node's already (no need to take it back)."""
        try:
            version = await self._state.run(self._change, [self._hash, self._trial_key(tag)],
                                            [str(tag), state, repr(opened_at)])
        except StateUnavailable:
            return  # this node keeps it to itself; the others learn the next change
        breakers = self._breakers
        with breakers.lock:
            slot = breakers.row_of_tag(tag)
            if slot is not None and slot.remote_version < version:
                slot.remote_version = version

    def _trial_key(self, tag: int) -> str:
        return self._state.key("breakers", "trial", str(tag))

    # ------------------------------------------------------------------ the poll

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll()
            except StateUnavailable:
                pass  # counted and logged by SharedState; local breakers meanwhile
            except Exception:  # never let one bad answer end the loop
                log.exception("breaker sync failed")

    async def poll(self) -> None:
        """One round trip: this node's counts out, the other nodes' counts and every breaker's state in;
        then a trial claimed (SET NX) for each breaker here that is due one."""
        # The claimed rows, found without the lock (a tag only ever goes from 0 to its value): the lock is the
        # hot path's, and is then held only over these few.
        rows = [slot for slot in self._breakers.rows() if slot.tag]
        args: list[Any] = [self._node, int(self._interval_s * _EXPIRY_POLLS * 1000)]
        for tag, count in self._local_counts(rows):
            args += [str(tag), count]
        others, states = await self._state.run(self._sync, [self._load, self._hash], args)
        self._take_counts(rows, others)
        self._take_states(states)
        for tag in self._due_trials(rows):
            key = self._trial_key(tag)
            won = await self._state.command("SET", key, self._node, "NX", "PX",
                                            max(1, int(self._breakers.cooldown_s * 1000)))
            if won:
                self._grant(tag)

    def _local_counts(self, rows: list[Any]) -> list[tuple[int, int]]:
        with self._breakers.lock:
            return [(slot.tag, slot.inflight_sum) for slot in rows]

    def _take_counts(self, rows: list[Any], pairs: list[Any]) -> None:
        counts: dict[int, int] = {}
        for i in range(0, len(pairs), 2):
            tag = int(pairs[i])
            counts[tag] = counts.get(tag, 0) + int(pairs[i + 1])
        with self._breakers.lock:
            for slot in rows:
                slot.remote_inflight = counts.get(slot.tag, 0)

    def _take_states(self, pairs: list[Any]) -> None:
        """Every newer version of a breaker's state than this node's row has seen (or made)."""
        breakers = self._breakers
        with breakers.lock:
            for i in range(0, len(pairs), 2):
                version, state, opened_at = (bytes(pairs[i + 1]).decode()).split("|")
                slot = breakers.row_of_tag(int(pairs[i]))
                if slot is None or int(version) <= slot.remote_version:
                    continue  # a backend this node never met, or nothing new
                slot.remote_version = int(version)
                if int(state) == OPEN:
                    breakers.open_row(slot, float(opened_at))
                elif int(state) == CLOSED:
                    breakers.close_row(slot)

    def _due_trials(self, rows: list[Any]) -> list[int]:
        """Rows whose breaker would grant a trial now, were trials granted locally."""
        breakers = self._breakers
        now, cooldown = breakers.now(), breakers.cooldown_s
        with breakers.lock:
            return [slot.tag for slot in rows if (
                (slot.state == OPEN and now - slot.opened_at >= cooldown)
                or (slot.state != CLOSED and slot.trial and now - slot.trial_at >= cooldown))]

    def _grant(self, tag: int) -> None:
        """This node won the trial: half-open, the trial not out yet (the next ``allow`` takes it)."""
        breakers = self._breakers
        with breakers.lock:
            slot = breakers.row_of_tag(tag)
            if slot is not None and slot.state != CLOSED:
                slot.state = HALF_OPEN
                slot.trial = 0
