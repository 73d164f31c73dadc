"""Redis connections for the caches: short timeouts, never a dependency for correctness."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from moemesh.cache.guard import REDIS_UNAVAILABLE, RedisGuard

# Seconds a cache call may take before the request goes on without the cache.
DEFAULT_TIMEOUT = 0.2


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> aioredis.Redis:
    """A pooled asyncio client whose every call fails fast when Redis is away."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def connect_without_retries(url: str, timeout: float) -> aioredis.Redis:
    """A client that never retries a call: an outage costs one timeout at most (for callers on the request path)."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), retry_on_timeout=False)


async def reachable(client: aioredis.Redis) -> bool:
    """True when Redis answers PING within the client's timeout."""
    # A fresh guard: a readiness probe must really ask Redis, never be skipped by another caller's open circuit.
    answer = await RedisGuard("readiness probe", errors=None, bypasses=None).run(client.ping, what="ping")
    return answer is not REDIS_UNAVAILABLE and bool(answer)
