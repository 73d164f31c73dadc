"""Per-tenant rate limits: requests per second and tokens per minute, shared by every gateway through Redis.

Each tenant has two token buckets, `moemesh:rl:{<tenant>}:req` and `moemesh:rl:{<tenant>}:tok` (one hash slot).
One Lua script checks and charges both atomically, timed by the Redis server's clock, so any number of gateway
replicas draw from the same buckets with one EVALSHA per request. A request is admitted only when both buckets
hold enough; otherwise nothing is charged and the caller is told how long the emptier bucket needs to refill.

Tokens are charged up front: the prompt's size estimate (characters / 4) plus max_tokens (256 when unset), capped
at the bucket's size so a single large request can always pass on a full bucket. Cache hits are charged like any
other request, requests and tokens: the charge happens before the cache is consulted, which keeps it one round
trip and the limits predictable.

Redis is never needed to serve: every call has a short timeout, and after repeated failures a circuit breaker
skips Redis for a while. Meanwhile each gateway enforces the same limits with in-process buckets (so with N
replicas a tenant may get up to N times its limit until Redis is back).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from moemesh.cache.kv_tier import CircuitBreaker
from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import Overloaded
from moemesh.v1 import worker_pb2

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
DEFAULT_MAX_TOKENS = 256
REDIS_TIMEOUT = 0.1
KEY_PREFIX = "moemesh:rl"

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
  redis.call('PEXPIRE', key, math.ceil(capacity / rate * 1000) + 1000)
end
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True)
class Bucket:
    key: str
    capacity: float
    rate: float  # refill per second
    cost: float


def estimate_tokens(work: worker_pb2.GenerationWork) -> int:
    """Prompt tokens (characters / 4) plus the most the request may generate."""
    chars = len(work.prompt.text) + sum(len(m.content) for m in work.prompt.chat.messages)
    max_tokens = work.sampling.max_tokens if work.sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    return chars // CHARS_PER_TOKEN + 1 + max_tokens


def estimate_text_tokens(texts: list[str]) -> int:
    return sum(len(t) // CHARS_PER_TOKEN + 1 for t in texts)


def buckets(tenant: Tenant, tokens: int) -> list[Bucket]:
    """The tenant's buckets and what this request costs in each (none when it has no limits)."""
    found = []
    if tenant.requests_per_second is not None:
        capacity = tenant.burst if tenant.burst is not None else max(1.0, tenant.requests_per_second)
        found.append(Bucket(f"{KEY_PREFIX}:{{{tenant.id}}}:req", capacity, tenant.requests_per_second, 1.0))
    if tenant.tokens_per_minute is not None:
        capacity = float(tenant.tokens_per_minute)
        found.append(Bucket(f"{KEY_PREFIX}:{{{tenant.id}}}:tok", capacity, capacity / 60.0,
                            float(min(max(tokens, 0), capacity))))
    return found


class LocalBuckets:
    """The same token buckets in this process (Redis away): (tokens, last refill) per key."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, wanted: list[Bucket]) -> tuple[bool, float]:
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


@dataclass
class LimiterStats:
    allowed: int = 0
    limited: int = 0
    redis_errors: int = 0
    local_checks: int = 0  # decided in-process (Redis failing or circuit open)


class RateLimiter:
    """Charges a tenant's request against its buckets; raises Overloaded (RESOURCE_EXHAUSTED / 429) when over."""

    def __init__(self, redis: aioredis.Redis | None, *, timeout: float = REDIS_TIMEOUT,
                 breaker: CircuitBreaker | None = None) -> None:
        self.redis = redis
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker(threshold=3, cooldown=5.0)
        self.local = LocalBuckets()
        self.stats = LimiterStats()
        self._script = redis.register_script(TOKEN_BUCKET_LUA) if redis is not None else None

    async def check(self, tenant: Tenant, tokens: int = 0) -> None:
        wanted = buckets(tenant, tokens)
        if not wanted:
            return
        allowed, wait = await self._take(wanted)
        if allowed:
            self.stats.allowed += 1
            return
        self.stats.limited += 1
        wait = max(wait, 0.001)
        raise Overloaded(f"rate limit exceeded for tenant {tenant.id!r}; retry after {wait:.3f}s", retry_after=wait)

    async def _take(self, wanted: list[Bucket]) -> tuple[bool, float]:
        if self._script is not None and self.breaker.allow():
            args = [v for b in wanted for v in (repr(b.capacity), repr(b.rate), repr(b.cost))]
            try:
                allowed, wait = await asyncio.wait_for(self._script(keys=[b.key for b in wanted], args=args),
                                                       self.timeout)
            except (aioredis.RedisError, OSError, asyncio.TimeoutError) as exc:
                self.stats.redis_errors += 1
                self.breaker.failure()
                log.debug("rate limiter: Redis failed (%s); deciding locally", type(exc).__name__)
            else:
                self.breaker.success()
                wait = float(wait)
                return int(allowed) == 1, wait if math.isfinite(wait) else 60.0
        self.stats.local_checks += 1
        return self.local.take(wanted)


def connect(url: str, timeout: float = REDIS_TIMEOUT) -> aioredis.Redis:
    """A client for the limiter: short timeouts and no retries, so a Redis outage costs one timeout at most."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
