"""The limits of accounts/limits.py held in Redis, for several appliances that must act as one ([state] url).

The same semantics, the same 429s and headers; only where the counters live changes. Per scope (a key id or
"model:<name>", never a slot number: slots are per node) there are two Redis keys:

- ``limits:<owner>``, a hash: the 60-bucket sliding window (fields r0..r59, t0..t59, their totals rt and tt,
  the newest bucket ``epoch``), and the budget period's spend (su, st) and reservations (ru, rk);
- ``inflight:<owner>``, a sorted set of the admissions in flight, scored by a deadline: a worker renews the
  deadlines of its own every lease_s / 3, so the places of a node that dies (kill -9) free themselves at the
  latest ``lease_s`` later.

admit is one Lua script over every scope of a request (one round trip, all-or-nothing, atomic across nodes);
settle is a second one, sent after the answer and batched with the other settles of the moment (a settle that
fails is dropped: its tokens stay at the estimate until the window slides past, its place until its deadline).
When Redis cannot be reached, ``[state] on_state_error`` decides: "open" admits without limits, "closed"
refuses with 503 state_unavailable.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from appliance.accounts.limits import (
    BUCKETS,
    Admission,
    Scope,
    budget_view,
    period_of,
    rate_headers,
    refusal,
)
from appliance.storage.state import SharedState, StateUnavailable

log = logging.getLogger("appliance.limits")

LEASE_S = 30.0  # a dead node's places in flight are free at most this long after its last renewal
# A settle that frees no place in flight waits at most this long for the next admit of its worker to carry it to
# Redis (one round trip for both): steady traffic pays no round trip of its own for settling tokens and spend.
SETTLE_DELAY_S = 0.005

# What every script shares: reading a scope's hash with its window slid to now and its period current, and
# writing it back. ARGV[1] is now, ARGV[2] the bucket's length; the math is limits.Limiter._slot's.
_COMMON = f"local N = {BUCKETS}\n" + """local now, bucket_s = tonumber(ARGV[1]), tonumber(ARGV[2])
local RING = {}
for i = 0, N - 1 do RING[#RING + 1] = 'r' .. i; RING[#RING + 1] = 't' .. i end
local function num(v) return tonumber(v) or 0 end
local function fmt(x) return string.format('%.17g', x) end

local function roll(key, period)
  local f = redis.call('HMGET', key, 'epoch', 'rt', 'tt', 'period', 'su', 'st', 'ru', 'rk')
  local s = {key = key, epoch = num(f[1]), rt = num(f[2]), tt = num(f[3]), period = f[4] or '',
             su = num(f[5]), st = num(f[6]), ru = num(f[7]), rk = num(f[8]), fresh = false}
  local gap = math.floor(now / bucket_s) - s.epoch
  if gap >= N then
    redis.call('HDEL', key, unpack(RING))
    s.rt, s.tt = 0, 0
  elseif gap > 0 then
    for i = 1, gap do
      local idx = (s.epoch + i) % N
      local old = redis.call('HMGET', key, 'r' .. idx, 't' .. idx)
      s.rt, s.tt = s.rt - num(old[1]), s.tt - num(old[2])
      redis.call('HDEL', key, 'r' .. idx, 't' .. idx)
    end
  end
  -- A node whose clock is behind counts in the newest bucket, never in one already slid past.
  if gap > 0 then s.epoch = s.epoch + gap end
  if period ~= '' and s.period ~= period then
    s.period, s.su, s.st, s.ru, s.rk, s.fresh = period, 0, 0, 0, 0, true
  end
  return s
end

local function save(s, ttl)
  redis.call('HSET', s.key, 'epoch', fmt(s.epoch), 'rt', fmt(s.rt), 'tt', fmt(s.tt), 'period', s.period,
             'su', fmt(s.su), 'st', fmt(s.st), 'ru', fmt(s.ru), 'rk', fmt(s.rk))
  redis.call('EXPIRE', s.key, ttl)
end
"""

# KEYS: per scope its hash, then its in-flight set. ARGV after now and bucket_s: admission id, lease deadline,
# lease ttl, tokens, cost, flags (counts_tokens, compute: "10"), the scope whose headers to show (0: none), then
# per scope: its limits ("rpm tpm max_concurrent budget_usd budget_tokens counts_price counts_compute", "-" for
# none: one argument, fewer to pack on the request path), period ('' none), ttl.
# Returns {'ok', headers...} or {'refused', scope, limit, wait, headers...}; headers: requests and tokens in the
# window, seconds until each is empty (limits.Limiter._headers's figures).
_ADMIT = _COMMON + """
local id, deadline, lease_ttl = ARGV[3], ARGV[4], ARGV[5]
local tokens, cost = tonumber(ARGV[6]), tonumber(ARGV[7])
local counts_tokens, compute, shown = ARGV[8]:sub(1, 1) == '1', ARGV[8]:sub(2, 2) == '1', tonumber(ARGV[9])
local FIRST, PER = 10, 3
local n = #KEYS / 2

local function arg(i, k) return ARGV[FIRST + (i - 1) * PER + k] end
local LIMITS = {}
for i = 1, n do
  local limits = {}
  for v in string.gmatch(arg(i, 0), '%S+') do limits[#limits + 1] = v end
  LIMITS[i] = limits
end

local function freed_in(s, series, excess)
  local dropped = 0
  for age = N - 1, 0, -1 do
    local b = s.epoch - age
    dropped = dropped + num(redis.call('HGET', s.key, series .. (b % N)))
    if dropped >= excess then return math.max((b + N) * bucket_s - now, bucket_s / 2) end
  end
  return N * bucket_s
end

local function last_expiry(s, series)
  for age = 0, N - 1 do
    local b = s.epoch - age
    if num(redis.call('HGET', s.key, series .. (b % N))) ~= 0 then return math.max((b + N) * bucket_s - now, 0) end
  end
  return 0
end

local function over_usd(s, budget, counts_price, counts_compute)
  local price = counts_price and cost or 0
  local used = s.su + s.ru + price
  if compute and counts_compute then return used >= budget end
  return price > 0 and used > budget
end

local function check(i, s)
  local L = LIMITS[i]
  local rpm, tpm, most, usd, budget_tokens = tonumber(L[1]), tonumber(L[2]), tonumber(L[3]), tonumber(L[4]),
                                             tonumber(L[5])
  if rpm and s.rt + 1 > rpm then return 'requests', freed_in(s, 'r', s.rt + 1 - rpm) end
  if tpm and tokens ~= 0 then
    if tokens > tpm then return 'too_large', 0 end
    if s.tt + tokens > tpm then return 'tokens', freed_in(s, 't', s.tt + tokens - tpm) end
  end
  if most then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', ARGV[1])  -- places whose holder stopped renewing them
    if redis.call('ZCARD', KEYS[2 * i]) + 1 > most then return 'concurrency', 1 end
  end
  if arg(i, 1) ~= '' then
    if usd and over_usd(s, usd, L[6] == '1', L[7] == '1') then return 'budget_usd', 0 end
    if budget_tokens and tokens ~= 0 and s.st + s.rk + tokens > budget_tokens then return 'budget_tokens', 0 end
  end
  return nil
end

local STATES = {}
local function view()
  if shown == 0 then return {} end
  local s = STATES[shown]
  return {fmt(s.rt), fmt(s.tt), fmt(last_expiry(s, 'r')), fmt(last_expiry(s, 't'))}
end

for i = 1, n do STATES[i] = roll(KEYS[2 * i - 1], arg(i, 1)) end
for i = 1, n do
  local limit, wait = check(i, STATES[i])
  if limit then
    local shows = view()
    for j = 1, n do save(STATES[j], arg(j, 2)) end  -- what slid out of the window stays out
    return {'refused', tostring(i), limit, fmt(wait), unpack(shows)}
  end
end
for i = 1, n do
  local s = STATES[i]
  local idx = s.epoch % N
  redis.call('HINCRBY', s.key, 'r' .. idx, 1)
  s.rt = s.rt + 1
  if counts_tokens then
    redis.call('HINCRBYFLOAT', s.key, 't' .. idx, fmt(tokens))
    s.tt = s.tt + tokens
    if arg(i, 1) ~= '' then
      if LIMITS[i][6] == '1' then s.ru = s.ru + cost end
      s.rk = s.rk + tokens
    end
  end
  if LIMITS[i][3] ~= '-' then
    redis.call('ZADD', KEYS[2 * i], deadline, id)
    redis.call('EXPIRE', KEYS[2 * i], lease_ttl)
  end
  save(s, arg(i, 2))
end
return {'ok', unpack(view())}
"""

# KEYS as admit's. ARGV after now and bucket_s: admission id, counts_tokens, tokens used, tokens estimated, cost
# estimated, then per scope: flags (counts_price, has a max_concurrent: "10"), period, charged (its budget's
# share of the real cost), ttl. limits.Limiter.settle's math.
_SETTLE = _COMMON + """
local id, counts_tokens = ARGV[3], ARGV[4] == '1'
local tokens, estimated, estimated_cost = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local FIRST, PER = 8, 4
for i = 1, #KEYS / 2 do
  local function arg(k) return ARGV[FIRST + (i - 1) * PER + k] end
  if arg(0):sub(2, 2) == '1' then redis.call('ZREM', KEYS[2 * i], id) end
  if counts_tokens then
    local s = roll(KEYS[2 * i - 1], arg(1))
    local delta = tokens - estimated
    redis.call('HINCRBYFLOAT', s.key, 't' .. (s.epoch % N), fmt(delta))
    s.tt = math.max(0, s.tt + delta)
    if arg(1) ~= '' then
      if arg(0):sub(1, 1) == '1' then s.ru = math.max(0, s.ru - estimated_cost) end
      s.rk = math.max(0, s.rk - estimated)
      s.su = s.su + tonumber(arg(2))
      s.st = s.st + tokens
    end
    save(s, arg(3))
  end
end
return 1
"""

# KEYS[1]: a scope's hash. ARGV after now and bucket_s: period, ttl. Returns rt, tt, su, st.
_READ = _COMMON + """
local s = roll(KEYS[1], ARGV[3])
save(s, ARGV[4])
return {fmt(s.rt), fmt(s.tt), fmt(s.su), fmt(s.st)}
"""

# KEYS[1]: a scope's hash. ARGV after now and bucket_s: period, spent usd, spent tokens, replace (1: always;
# 0: only when the ledger's spend was not seeded for this period yet ('sd'), so N nodes starting, or the workers
# finding a restarted Redis, do not add it N times; what was counted meanwhile is kept if it is more), ttl.
_PRELOAD = _COMMON + """
local s = roll(KEYS[1], ARGV[3])
local replace = ARGV[6] == '1'
local seeded = replace or redis.call('HGET', KEYS[1], 'sd') ~= ARGV[3]
if replace then
  s.su, s.st = tonumber(ARGV[4]), tonumber(ARGV[5])
elseif seeded then
  s.su, s.st = math.max(s.su, tonumber(ARGV[4])), math.max(s.st, tonumber(ARGV[5]))
end
save(s, ARGV[7])
if seeded then redis.call('HSET', KEYS[1], 'sd', ARGV[3]) end
return seeded and 1 or 0
"""


# How long a scope's hash outlives its last use: past its window, or past the end of its budget period.
_PERIOD_TTL_S = {"day": 2 * 86400, "week": 8 * 86400, "month": 32 * 86400}


@functools.lru_cache(maxsize=4096)
def _limits_arg(scope: Scope) -> str:
    """A scope's limits as the admit script reads them: one argument, made once per scope."""
    values = (scope.rpm, scope.tpm, scope.max_concurrent, scope.budget_usd, scope.budget_tokens)
    return " ".join(["-" if v is None else repr(v) for v in values]
                    + [str(int(scope.counts_price)), str(int(scope.counts_compute))])


class RedisLimiter:
    """limits.Limiter's operations over Redis; one per worker, on the worker's SharedState."""

    def __init__(self, state: SharedState, window_s: float, *, clock: Callable[[], float] = time.time,
                 lease_s: float = LEASE_S) -> None:
        self._state = state
        self._window = window_s
        self._bucket_s = window_s / BUCKETS
        self._clock = clock
        self._lease_s = lease_s
        self._lease_ttl = math.ceil(lease_s) + 1  # an in-flight set nobody renews goes away whole
        self._bucket_arg = repr(self._bucket_s)
        self._closed = state.settings.on_state_error == "closed"
        self._admit = state.script(_ADMIT)
        self._settle = state.script(_SETTLE)
        self._read = state.script(_READ)
        self._preload = state.script(_PRELOAD)
        self._ids = itertools.count()
        self._node = os.urandom(6).hex()  # this worker's admission ids: unique across nodes
        self._held: dict[str, tuple[str, ...]] = {}  # admission id -> the in-flight sets it has a place in
        self._pending: list[tuple[list[str], list[Any]]] = []  # settles not sent yet
        self._flushing: asyncio.Task[None] | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._renewing: asyncio.Task[None] | None = None

    @property
    def window_s(self) -> float:
        return self._window

    @property
    def state(self) -> SharedState:
        return self._state

    def _keys(self, scope: Scope) -> tuple[str, str]:
        return self._state.key("limits", scope.owner), self._state.key("inflight", scope.owner)

    def _ttl(self, scope: Scope) -> int:
        return math.ceil(self._window + _PERIOD_TTL_S.get(scope.budget_period or "", 60))

    # ---------------------------------------------------------------- the request path

    async def admit(self, scopes: tuple[Scope, ...], *, tokens: float, cost: float, counts_tokens: bool = True,
                    headers_for: Scope | None = None, compute: bool = False) -> Admission | None:
        """limits.Limiter.admit in one Lua script. None: Redis is unreachable and on_state_error = "open" (the
        request passes with no limit counted, nothing to settle)."""
        now = self._clock()
        ident = f"{self._node}:{next(self._ids)}"
        keys: list[str] = []
        counted_tokens, counted_cost = (float(tokens), float(cost)) if counts_tokens else (0.0, 0.0)
        args: list[Any] = [repr(now), self._bucket_arg, ident, repr(now + self._lease_s), self._lease_ttl,
                           repr(counted_tokens), repr(counted_cost),
                           "1" + ("1" if compute else "0") if counts_tokens else "00",
                           scopes.index(headers_for) + 1 if headers_for else 0]
        for scope in scopes:
            keys.extend(self._keys(scope))
            args.extend((_limits_arg(scope), _period(scope, now), self._ttl(scope)))
        carried, self._pending = self._pending, []  # settles ride along: one round trip for all, in order
        try:
            answer = (await self._state.run_all([*((self._settle, k, a) for k, a in carried),
                                                 (self._admit, keys, args)]))[-1]
        except StateUnavailable:
            if self._closed:
                raise self._state.refusal("This request's limits cannot be checked right now: they live in") from None
            return None  # SharedState warned once for this outage and counted it
        answer = [part.decode() if isinstance(part, bytes) else str(part) for part in answer]
        if answer[0] == "refused":
            scope = scopes[int(answer[1]) - 1]
            refused = refusal(scope, answer[2], self._window, float(answer[3]), tokens=tokens)
            if headers_for is not None:  # a refusal shows the client's standing too, as OpenAI's does
                refused.headers = {**self._headers(headers_for, answer[4:]), **refused.headers}
            raise refused
        held = tuple(keys[2 * i + 1] for i, scope in enumerate(scopes) if scope.max_concurrent is not None)
        if held:
            self._held[ident] = held
            self._start_renewing()
        headers = self._headers(headers_for, answer[1:]) if headers_for is not None else {}
        return Admission(scopes, tokens, cost, counts_tokens, headers, ident=ident)

    @staticmethod
    def _headers(scope: Scope, figures: Sequence[str]) -> dict[str, str]:
        requests, tokens, reset_requests, reset_tokens = (float(f) for f in figures)
        return rate_headers(scope, requests, tokens, reset_requests, reset_tokens)

    def settle(self, admission: Admission, *, tokens: float, cost: float, compute_cost: float = 0.0) -> None:
        """limits.Limiter.settle, sent after the answer: queued here, and carried by the next admit of this
        worker (before it, in the same round trip) or sent with the other settles of the moment after
        SETTLE_DELAY_S, whichever comes first."""
        if admission.settled:
            return
        admission.settled = True
        held = self._held.pop(admission.ident, None)
        if not admission.counts_tokens and held is None:
            return  # nothing to release: its request counts in the window as it should
        now = self._clock()
        keys: list[str] = []
        args: list[Any] = [repr(now), self._bucket_arg, admission.ident, int(admission.counts_tokens),
                           repr(float(tokens)), repr(float(admission.tokens)), repr(float(admission.cost))]
        for scope in admission.scopes:
            flags = ("1" if scope.counts_price else "0") + ("1" if scope.max_concurrent is not None else "0")
            keys.extend(self._keys(scope))
            args.extend((flags, _period(scope, now), repr(float(scope.charged(cost, compute_cost))),
                         self._ttl(scope)))
        self._pending.append((keys, args))
        if held is not None:  # a place in flight: free it at once (the client's next request may be on its way)
            self._flush_soon()
        elif self._flush_timer is None and self._flushing is None:
            self._flush_timer = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_timer = None
        if self._pending and self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush(), name="limits-settle")

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._state.run_all([(self._settle, keys, args) for keys, args in batch])
                except StateUnavailable:
                    log.debug("%d settle(s) dropped: the shared state is unreachable", len(batch))
        finally:
            self._flushing = None

    async def settled(self) -> None:
        """Every settle queued so far has been sent (or dropped)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush_soon()
        while self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)

    # ---------------------------------------------------------------- places in flight

    def _start_renewing(self) -> None:
        if self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew_loop(), name="limits-leases")

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self.renew()
            except StateUnavailable:
                pass  # counted and logged by the SharedState; the next round tries again

    async def renew(self) -> None:
        """Push back the deadlines of this worker's places in flight (only those still there: XX)."""
        if not self._held:
            return
        deadline = self._clock() + self._lease_s
        held = list(self._held.items())

        await self._state.commands([command for ident, sets in held for key in sets for command in (
            ("ZADD", key, "XX", repr(deadline), ident), ("EXPIRE", key, self._lease_ttl))])

    # ---------------------------------------------------------------- off the request path

    async def preload(self, scope: Scope, *, spent_usd: float, spent_tokens: float, replace: bool = False) -> bool:
        """What the current budget period already used, from the ledger: set only where Redis has nothing of
        this period yet (each node starting seeds it; the first one wins), or always with ``replace`` (the
        key's budget now counts something else). True when it was set."""
        now = self._clock()
        key, _ = self._keys(scope)
        seeded = await self._state.run(self._preload, [key], [
            repr(now), self._bucket_arg, _period(scope, now), repr(float(spent_usd)), repr(float(spent_tokens)),
            int(replace), self._ttl(scope)])
        return bool(seeded)

    async def budget_state(self, scope: Scope) -> dict[str, Any]:
        """limits.Limiter.budget_state from Redis. Raises StateUnavailable when it cannot be reached."""
        now = self._clock()
        key, _ = self._keys(scope)
        figures = await self._state.run(self._read, [key], [repr(now), self._bucket_arg, _period(scope, now),
                                                            self._ttl(scope)])
        requests, tokens, spent_usd, spent_tokens = (float(f) for f in figures)
        return budget_view(scope, now, requests, tokens, spent_usd, spent_tokens)

    async def close(self) -> None:
        """At worker stop: the settles still queued go out; this worker's places in flight are given back."""
        if self._renewing is not None:
            self._renewing.cancel()
        await self.settled()
        if self._held:
            held, self._held = self._held, {}

            try:
                await self._state.commands([("ZREM", key, ident) for ident, sets in held.items() for key in sets])
            except StateUnavailable:
                pass  # they free themselves at their deadline


def _period(scope: Scope, now: float) -> str:
    return str(period_of(scope.budget_period, now)) if scope.budget_period else ""
