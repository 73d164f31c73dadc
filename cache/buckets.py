"""Token buckets shared through Redis: one Lua script checks and charges all of a request's buckets atomically.

The script runs on the Redis server's clock, so any number of gateway replicas
draw from the same buckets with one EVALSHA per request. A request is admitted
only when every bucket holds enough; otherwise nothing is charged and the
caller learns how long the emptiest bucket needs to refill. Buckets expire once
they would be full again (nothing to remember).

A charge made up front can be settled later (`TokenBuckets.adjust`): the
difference between the estimate and what was really used is refunded, or
charged, even past empty (a bucket in debt refills before it admits again).

Redis is never needed to decide: calls run under a `RedisGuard` with a short
overall timeout, and while Redis is failing the same buckets are kept in
process (so with N replicas a tenant may get up to N times its limit until
Redis is back). Which buckets a request is charged to, and how much, is the
caller's policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from moemesh.cache.guard import REDIS_UNAVAILABLE, CircuitBreaker, RedisGuard

REDIS_TIMEOUT = 0.1  # seconds one check may wait for Redis before it is decided in process
MAX_WAIT = 60.0  # the wait reported when the script answers a non-finite one (a bucket that never refills)

# KEYS[i]: bucket i; ARGV: 3 numbers per bucket (capacity, refill per second, cost).
# Returns {1, "0"} when every bucket had enough (all charged), else {0, "<seconds until the costs fit>"}.
TOKEN_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1]) or capacity
  local ts = tonumber(state[2]) or now
  tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if tokens < cost then
    wait = math.max(wait, (cost - tokens) / rate)
  end
end
local allowed = 0
if wait == 0 then allowed = 1 end
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local tokens = levels[i]
  if allowed == 1 then tokens = tokens - tonumber(ARGV[3 * i]) end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((capacity - tokens) / rate * 1000) + 1000)
end
return {allowed, tostring(wait)}
"""

# KEYS[1]: one bucket; ARGV: capacity, refill per second, delta. Takes `delta` from the bucket (a negative delta
# gives it back), never above capacity but possibly below zero: a debt that delays the next admission.
# Returns the bucket's level after.
ADJUST_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate - tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return tostring(tokens)
"""


@dataclass(frozen=True)
class Bucket:
    """One token bucket, and what the request being checked costs in it."""

    key: str
    capacity: float
    rate: float  # refill per second
    cost: float


@dataclass
class BucketStats:
    """How checks were decided."""

    redis_errors: int = 0
    local_checks: int = 0  # decided in-process (Redis failing, circuit open, or none configured)


class LocalBuckets:
    """The same token buckets in this process (Redis away): (tokens, last refill) per key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, wanted: list[Bucket]) -> tuple[bool, float]:
        """(True, 0) after charging every bucket, or (False, seconds until all fit) charging none."""
        now = self.clock()
        levels, wait = [], 0.0
        for b in wanted:
            tokens, ts = self.state.get(b.key, (b.capacity, now))
            tokens = min(b.capacity, tokens + max(0.0, now - ts) * b.rate)
            levels.append(tokens)
            if tokens < b.cost:
                wait = max(wait, (b.cost - tokens) / b.rate)
        allowed = wait == 0
        for b, tokens in zip(wanted, levels, strict=True):
            self.state[b.key] = (tokens - b.cost if allowed else tokens, now)
        return allowed, wait

    def adjust(self, bucket: Bucket) -> float:
        """Take `bucket.cost` (negative: give it back), capped at capacity, possibly into debt; the level after."""
        now = self.clock()
        tokens, ts = self.state.get(bucket.key, (bucket.capacity, now))
        tokens = min(bucket.capacity, tokens + max(0.0, now - ts) * bucket.rate - bucket.cost)
        self.state[bucket.key] = (tokens, now)
        return tokens


class TokenBuckets:
    """Buckets in Redis, shared by every client of the same server; in process while Redis is away."""

    def __init__(self, client: aioredis.Redis | None, *, timeout: float = REDIS_TIMEOUT,
                 breaker: CircuitBreaker | None = None, stats: BucketStats | None = None) -> None:
        self.client = client
        self.stats = stats if stats is not None else BucketStats()
        self.guard = RedisGuard("rate limiter", breaker, timeout=timeout, stats=self.stats, errors="redis_errors",
                                bypasses=None)
        self.local = LocalBuckets()
        self._script = client.register_script(TOKEN_BUCKET_LUA) if client is not None else None
        self._adjust_script = client.register_script(ADJUST_LUA) if client is not None else None

    async def take(self, wanted: list[Bucket]) -> tuple[bool, float]:
        """(True, 0) after charging every bucket, or (False, seconds until all fit) charging none."""
        if self._script is not None:
            answer = await self.guard.run(self._take_shared, wanted, what="token bucket script")
            if answer is not REDIS_UNAVAILABLE:
                return answer
        self.stats.local_checks += 1
        return self.local.take(wanted)

    async def adjust(self, bucket: Bucket) -> float:
        """Settle a charge made before: take `bucket.cost` more (negative: refund it); the level after."""
        if self._adjust_script is not None:
            answer = await self.guard.run(self._adjust_script, [bucket.key],
                                          [repr(bucket.capacity), repr(bucket.rate), repr(bucket.cost)],
                                          what="token bucket adjust")
            if answer is not REDIS_UNAVAILABLE:
                return float(answer)
        return self.local.adjust(bucket)

    async def _take_shared(self, wanted: list[Bucket]) -> tuple[bool, float]:
        args = [v for b in wanted for v in (repr(b.capacity), repr(b.rate), repr(b.cost))]
        allowed, wait = await self._script(keys=[b.key for b in wanted], args=args)
        wait = float(wait)
        return int(allowed) == 1, wait if math.isfinite(wait) else MAX_WAIT
