"""The one Redis wrapper: the circuit breaker's states, and guarded calls against a real redis-server."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import redis
import redis.asyncio as aioredis

from moemesh.cache.client import reachable
from moemesh.cache.guard import REDIS_UNAVAILABLE, CircuitBreaker, RedisGuard
from tests.support.redis_server import RedisServer


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Counters:
    """A caller's own counters, under the names its metrics export."""

    errors: int = 0
    bypassed: int = 0


@pytest.fixture
def server():
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


# ---- the breaker's state machine (no Redis) ---------------------------------------------------------------------------
def test_the_circuit_opens_after_threshold_consecutive_failures(clock):
    breaker = CircuitBreaker(threshold=3, cooldown=5.0, clock=clock)
    breaker.failure()
    breaker.failure()
    assert breaker.allow() and breaker.opened_at is None, "two failures of three: still closed"
    breaker.failure()
    assert breaker.opened_at == clock.now and not breaker.allow(), "the third consecutive failure opens it"


def test_a_success_resets_the_count_of_consecutive_failures(clock):
    breaker = CircuitBreaker(threshold=3, clock=clock)
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert breaker.allow(), "failures separated by a success are not consecutive"


def test_an_open_circuit_half_opens_once_per_cooldown(clock):
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.failure()
    clock.now += 4.9
    assert not breaker.allow(), "still cooling down"
    clock.now += 0.1
    assert breaker.allow(), "after the cool-down one probe goes through"
    assert not breaker.allow(), "and only one: the next waits for another cool-down"
    clock.now += 5.0
    assert breaker.allow()


def test_a_failed_probe_reopens_and_a_good_one_closes(clock):
    breaker = CircuitBreaker(threshold=2, cooldown=1.0, clock=clock)
    breaker.failure()
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.failure()
    assert breaker.opened_at == clock.now and not breaker.allow(), "a failed probe starts a new cool-down"
    clock.now += 1.0
    assert breaker.allow()
    breaker.success()
    assert breaker.opened_at is None and breaker.failures == 0
    assert all(breaker.allow() for _ in range(5)), "closed again: every call goes through"


# ---- guarded calls against a real Redis -------------------------------------------------------------------------------
def test_a_call_returns_redis_answer_and_none_is_an_answer_not_a_failure(server):
    counters = Counters()
    guard = RedisGuard("test", stats=counters, bypasses="bypassed")
    client = redis.Redis.from_url(server.url, socket_timeout=0.5)
    assert guard.call(client.set, "k", b"v") is True
    assert guard.call(client.get, "k") == b"v"
    assert guard.call(client.get, "absent") is None, "a missing key is None, distinct from REDIS_UNAVAILABLE"
    assert counters == Counters() and guard.breaker.opened_at is None


def test_redis_down_opens_the_circuit_then_calls_are_bypassed_without_waiting(server):
    counters = Counters()
    guard = RedisGuard("test", stats=counters, bypasses="bypassed")
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    server.stop()
    for _ in range(3):
        assert guard.call(client.get, "k") is REDIS_UNAVAILABLE
    assert counters.errors == 3 and guard.breaker.opened_at is not None, "three failures open the circuit"
    started = time.monotonic()
    for _ in range(10):
        assert guard.call(client.get, "k", weight=4) is REDIS_UNAVAILABLE
    assert time.monotonic() - started < 0.05, "an open circuit must not touch Redis at all"
    assert counters.errors == 3 and counters.bypassed == 40, "bypasses are counted by weight, not as errors"


def test_after_the_cooldown_one_probe_reaches_redis_and_its_success_closes_the_circuit(server, clock):
    counters = Counters()
    # The test moves the clock, so that restarting Redis (slow on a loaded host) cannot outlast the cooldown.
    guard = RedisGuard("test", CircuitBreaker(threshold=2, cooldown=0.3, clock=clock), stats=counters,
                       bypasses="bypassed")
    client = redis.Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    server.stop()
    guard.call(client.get, "k")
    guard.call(client.get, "k")
    server.start()
    assert guard.call(client.get, "k") is REDIS_UNAVAILABLE and counters.bypassed == 1, "still cooling down"
    clock.now += 0.35
    assert guard.call(client.get, "k") is None, "the probe reached the restarted Redis"
    assert guard.breaker.opened_at is None and guard.breaker.failures == 0, "and closed the circuit"
    assert guard.call(client.set, "k", b"v") is True


def test_even_if_open_attempts_the_call_and_records_its_outcome(server):
    guard = RedisGuard("test", CircuitBreaker(threshold=1, cooldown=60.0), stats=Counters(), bypasses="bypassed")
    guard.breaker.failure()
    client = redis.Redis.from_url(server.url, socket_timeout=0.5)
    assert guard.call(client.get, "k") is REDIS_UNAVAILABLE
    assert guard.call(client.set, "k", b"v", even_if_open=True) is True, "work under way still writes"
    assert guard.breaker.opened_at is None, "Redis answered: the circuit closes"


async def test_a_slow_call_is_cut_off_by_the_guard_timeout(server):
    counters = Counters()
    guard = RedisGuard("test", timeout=0.1, stats=counters, bypasses="bypassed")
    client = aioredis.from_url(server.url, socket_timeout=5.0)  # the socket would wait far longer
    started = time.monotonic()
    assert await guard.run(client.blpop, ["never-filled"], 2) is REDIS_UNAVAILABLE
    assert time.monotonic() - started < 1.0, "the guard's timeout, not the 2 s block, bounds the call"
    assert counters.errors == 1 and guard.breaker.failures == 1
    guard.timeout = 5.0  # the ping opens a new connection (the cut-off call's was dropped): not what is tested here
    assert await guard.run(client.ping) is True and guard.breaker.failures == 0
    await client.aclose()


def test_a_silent_redis_costs_one_socket_timeout(server):
    counters = Counters()
    guard = RedisGuard("test", stats=counters, bypasses="bypassed")
    client = redis.Redis.from_url(server.url, socket_timeout=0.1)
    server.pause()
    try:
        started = time.monotonic()
        assert guard.call(client.get, "k") is REDIS_UNAVAILABLE
        assert time.monotonic() - started < 1.0, "a silent Redis costs one socket timeout"
    finally:
        server.resume()
    assert counters.errors == 1


async def test_readiness_probe_asks_redis_itself(server):
    client = aioredis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    assert await reachable(client)
    server.stop()
    assert not await reachable(client)
    await client.aclose()
