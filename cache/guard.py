"""The one way moemesh calls Redis: under a circuit breaker and a short timeout, never as a dependency for correctness.

Every Redis user (response and embedding caches, prefix-KV tier, stream journal,
rate-limit buckets) runs its calls through a `RedisGuard`. A call that fails (a
Redis error, a socket error, the timeout) is counted and recorded by the
breaker; after `threshold` consecutive failures the circuit opens and calls are
skipped (counted as bypasses) until the cool-down has passed, when one call is
let through to probe. Either way the caller gets `REDIS_UNAVAILABLE` instead of
an exception and carries on as it would without Redis.

Timeouts: each client is built with redis-py's own socket timeouts (see
`cache/client.py`); a guard may add an overall deadline for asyncio calls, for
callers that must bound several round trips together (the rate limiter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import redis

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a failed Redis call raises: redis-py's errors, and socket errors (asyncio's TimeoutError is an OSError).
REDIS_ERRORS: Final = (redis.RedisError, OSError)


class _Unavailable:
    """The type of `REDIS_UNAVAILABLE`."""

    def __repr__(self) -> str:
        return "REDIS_UNAVAILABLE"


# Returned instead of a result when the call was skipped (circuit open) or failed: a distinct value, because
# None is a legitimate Redis answer (a missing key).
REDIS_UNAVAILABLE: Final = _Unavailable()


class CircuitBreaker:
    """Opens after `threshold` consecutive failures; lets one call through per `cooldown` seconds while open."""

    def __init__(self, threshold: int = 3, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None

    def allow(self) -> bool:
        """Whether a call may go to Redis now (closed, or half-open: the first call after the cool-down)."""
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.cooldown:
            self.opened_at = self.clock()  # half-open: one try per cooldown
            return True
        return False

    def success(self) -> None:
        """Redis answered: close the circuit."""
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        """Redis failed: one more consecutive failure (the circuit opens, or stays open, at the threshold)."""
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = self.clock()


class RedisGuard:
    """Runs Redis calls under one breaker; a skipped or failed call answers `REDIS_UNAVAILABLE` and is counted.

    `stats` is the caller's own counters object; `errors` and `bypasses` name
    its fields that count failed calls and skipped ones (None: not counted), so
    every user keeps the counter names its metrics already export.
    """

    def __init__(self, name: str, breaker: CircuitBreaker | None = None, *, timeout: float | None = None,
                 stats: object | None = None, errors: str | None = "errors", bypasses: str | None = "bypasses",
                 log_level: int = logging.DEBUG) -> None:
        self.name = name
        self.breaker = breaker or CircuitBreaker()
        self.timeout = timeout  # overall deadline of one asyncio call, on top of the client's socket timeouts
        self.stats = stats
        self.errors = errors
        self.bypasses = bypasses
        self.log_level = log_level

    def call(self, fn: Callable[..., T], *args, weight: int = 1, what: str = "call",
             even_if_open: bool = False) -> T | _Unavailable:
        """`fn(*args)` (blocking), or REDIS_UNAVAILABLE when skipped or failed.

        `weight`: how many items a skip counts as (blocks, keys); `even_if_open`:
        attempt it even while the circuit is open (work already under way that
        must not lose its writes), still recording the outcome.
        """
        if not self._admit(weight, even_if_open):
            return REDIS_UNAVAILABLE
        try:
            result = fn(*args)
        except REDIS_ERRORS as exc:
            return self._failed(what, exc)
        self.breaker.success()
        return result

    async def run(self, fn: Callable[..., Awaitable[T]], *args, weight: int = 1, what: str = "call",
                  even_if_open: bool = False) -> T | _Unavailable:
        """`await fn(*args)` within the guard's timeout, or REDIS_UNAVAILABLE when skipped or failed (as `call`)."""
        if not self._admit(weight, even_if_open):
            return REDIS_UNAVAILABLE
        try:
            result = await asyncio.wait_for(fn(*args), self.timeout)
        except REDIS_ERRORS as exc:
            return self._failed(what, exc)
        self.breaker.success()
        return result

    def _admit(self, weight: int, even_if_open: bool) -> bool:
        if even_if_open or self.breaker.allow():
            return True
        self._count(self.bypasses, weight)
        return False

    def _failed(self, what: str, exc: Exception) -> _Unavailable:
        self._count(self.errors, 1)
        self.breaker.failure()
        log.log(self.log_level, "%s: Redis %s failed (%s: %s); going on without it", self.name, what,
                type(exc).__name__, exc)
        return REDIS_UNAVAILABLE

    def _count(self, field: str | None, n: int) -> None:
        if self.stats is not None and field is not None:
            setattr(self.stats, field, getattr(self.stats, field) + n)
