"""Per-tenant rate limits: requests per second and tokens per minute, shared by every gateway through Redis.

Each tenant has two token buckets, `moemesh:rl:{<tenant>}:req` and `moemesh:rl:{<tenant>}:tok` (one hash slot),
kept by `cache/buckets.py`: one Lua script checks and charges both atomically, so any number of gateway replicas
draw from the same buckets with one EVALSHA per request. A request is admitted only when both buckets hold enough;
otherwise nothing is charged and the caller is told how long the emptier bucket needs to refill.

Tokens are charged up front: the request cost estimate of `services/core/costs.py` (prompt characters / 4 plus
max_tokens, the contract's default when unset), capped at the bucket's size so a single large request can always
pass on a full bucket. When the request ends with its real usage (prompt plus completion tokens, as the answer
reports them), `settle` charges the difference: a refund when the answer was shorter than the estimate, a further
charge when it was longer (a CJK prompt runs at about a token per character, not four characters per token),
which may leave the bucket in debt until it refills. A request that ends without a usage (an error, a
disconnect) keeps its up-front charge. Cache hits are charged like any other request, requests and tokens: the
charge happens before the cache is consulted, which keeps it one round trip and the limits predictable; a hit is
then settled at the usage of the answer it replays.

Redis is never needed to serve: calls have a short timeout, and after repeated failures a circuit breaker skips
Redis for a while. Meanwhile each gateway enforces the same limits with in-process buckets (so with N replicas a
tenant may get up to N times its limit until Redis is back).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from moemesh.cache.buckets import REDIS_TIMEOUT, TOKEN_BUCKET_LUA, Bucket, BucketStats, LocalBuckets, TokenBuckets
from moemesh.cache.client import connect_without_retries
from moemesh.cache.guard import CircuitBreaker
from moemesh.gateway.tenants import Tenant
from moemesh.services.core.costs import CHARS_PER_TOKEN, DEFAULT_MAX_TOKENS, estimate_text_tokens, estimate_tokens
from moemesh.services.core.errors import RateLimited

__all__ = [
    "CHARS_PER_TOKEN", "DEFAULT_MAX_TOKENS", "KEY_PREFIX", "REDIS_TIMEOUT", "TOKEN_BUCKET_LUA", "Bucket",
    "CircuitBreaker", "LimiterStats", "LocalBuckets", "RateLimiter", "buckets", "connect", "estimate_text_tokens",
    "estimate_tokens",
]

KEY_PREFIX = "moemesh:rl"
MIN_RETRY_AFTER = 0.001  # seconds: a refusal always tells the client to wait a little


def buckets(tenant: Tenant, tokens: int) -> list[Bucket]:
    """The tenant's buckets and what this request costs in each (none when it has no limits)."""
    found = []
    if tenant.requests_per_second is not None:
        capacity = tenant.burst if tenant.burst is not None else max(1.0, tenant.requests_per_second)
        found.append(Bucket(f"{KEY_PREFIX}:{{{tenant.id}}}:req", capacity, tenant.requests_per_second, 1.0))
    if tenant.tokens_per_minute is not None:
        capacity = float(tenant.tokens_per_minute)
        found.append(Bucket(_tokens_key(tenant), capacity, capacity / 60.0,
                            float(min(max(tokens, 0), capacity))))
    return found


def _tokens_key(tenant: Tenant) -> str:
    return f"{KEY_PREFIX}:{{{tenant.id}}}:tok"


@dataclass
class LimiterStats(BucketStats):
    """Checks admitted and refused, and how they were decided (Redis or in process)."""

    allowed: int = 0
    limited: int = 0


class RateLimiter:
    """Charges a tenant's request against its buckets; raises RateLimited (RESOURCE_EXHAUSTED / 429) when over."""

    def __init__(self, redis: aioredis.Redis | None, *, timeout: float = REDIS_TIMEOUT,
                 breaker: CircuitBreaker | None = None) -> None:
        self.redis = redis
        self.timeout = timeout
        self.stats = LimiterStats()
        self.store = TokenBuckets(redis, timeout=timeout, breaker=breaker or CircuitBreaker(threshold=3, cooldown=5.0),
                                  stats=self.stats)
        self.breaker = self.store.guard.breaker
        self.local = self.store.local

    async def check(self, tenant: Tenant, tokens: int = 0) -> int:
        """Admit (and charge) the request, or raise RateLimited with the wait until it would fit; the tokens
        charged (the estimate, capped at the bucket's size; 0 without a tokens limit), for `settle`."""
        wanted = buckets(tenant, tokens)
        if not wanted:
            return 0
        allowed, wait = await self.store.take(wanted)
        if allowed:
            self.stats.allowed += 1
            return next((int(b.cost) for b in wanted if b.key.endswith(":tok")), 0)
        self.stats.limited += 1
        wait = max(wait, MIN_RETRY_AFTER)
        raise RateLimited(f"rate limit exceeded for tenant {tenant.id!r}; retry after {wait:.3f}s", retry_after=wait)

    async def settle(self, tenant: Tenant, charged: int, used: int) -> None:
        """Reconcile a request's up-front charge (`charged`, what `check` returned) with the tokens it really
        `used`: the difference is refunded or charged to the tenant's tokens bucket."""
        if tenant.tokens_per_minute is None or used == charged:
            return
        capacity = float(tenant.tokens_per_minute)
        await self.store.adjust(Bucket(_tokens_key(tenant), capacity, capacity / 60.0, float(used - charged)))


def connect(url: str, timeout: float = REDIS_TIMEOUT) -> aioredis.Redis:
    """A client for the limiter: short timeouts and no retries, so a Redis outage costs one timeout at most."""
    return connect_without_retries(url, timeout)
