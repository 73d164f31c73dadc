"""Redis connections for the caches: short timeouts, never a dependency for correctness."""

from __future__ import annotations

import redis.asyncio as aioredis

# Seconds a cache call may take before the request goes on without the cache.
DEFAULT_TIMEOUT = 0.2


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> aioredis.Redis:
    """A pooled asyncio client whose every call fails fast when Redis is away."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


async def reachable(client: aioredis.Redis) -> bool:
    """True when Redis answers PING within the client's timeout."""
    try:
        return bool(await client.ping())
    except (aioredis.RedisError, OSError):
        return False
