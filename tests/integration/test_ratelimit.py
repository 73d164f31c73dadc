"""Per-tenant rate limits against a real redis-server: bursts, sharing between gateways, Redis outages."""

from __future__ import annotations

import asyncio
import time

import pytest

from moemesh.gateway import ratelimit
from moemesh.gateway.ratelimit import LocalBuckets, RateLimiter, buckets, estimate_tokens
from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import Overloaded
from moemesh.v1 import common_pb2, worker_pb2
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def patient(url: str) -> RateLimiter:
    """A limiter whose Redis calls may take seconds: for the tests of what Redis decides, not of its timeout (with the
    default 100 ms, a first check, which opens a connection and loads the script, can overrun on a loaded host and be
    decided in-process instead: a designed fallback, tested below)."""
    return RateLimiter(ratelimit.connect(url, timeout=5.0), timeout=5.0)


def tenant(name: str, **limits) -> Tenant:
    return Tenant(id=name, **limits)


async def admitted(limiter: RateLimiter, who: Tenant, n: int, tokens: int = 0) -> tuple[int, list[Overloaded]]:
    ok, refused = 0, []
    for _ in range(n):
        try:
            await limiter.check(who, tokens)
            ok += 1
        except Overloaded as exc:
            refused.append(exc)
    return ok, refused


def test_requests_bucket_allows_the_burst_then_refuses_with_the_refill_wait(redis_server):
    async def go():
        limiter = patient(redis_server.url)
        client = limiter.redis
        who = tenant("burst", requests_per_second=2, burst=5)
        ok, refused = await admitted(limiter, who, 8)
        assert ok == 5 and len(refused) == 3
        assert 0.2 < refused[0].retry_after <= 0.5  # one request refills in 1/2 s
        assert "rate limit" in str(refused[0])
        assert limiter.stats.redis_errors == 0 and limiter.stats.local_checks == 0
        await asyncio.sleep(refused[-1].retry_after + 0.05)
        await limiter.check(who)  # refilled
        keys = sorted(k.decode() for k in await client.keys("moemesh:rl:*"))
        assert keys == ["moemesh:rl:{burst}:req"]
        assert 0 < await client.pttl(keys[0]) <= 3500
        await client.aclose()

    asyncio.run(go())


def test_tokens_per_minute_charges_the_estimate_and_tells_the_wait(redis_server):
    async def go():
        limiter = patient(redis_server.url)
        who = tenant("tokens", tokens_per_minute=600)  # refills 10 tokens per second
        await limiter.check(who, 500)
        with pytest.raises(Overloaded) as err:
            await limiter.check(who, 200)
        assert 9 < err.value.retry_after <= 10.5  # ~100 missing tokens at 10/s
        await limiter.check(who, 90)  # a smaller request still fits: nothing was charged for the refusal
        await limiter.check(tenant("other", tokens_per_minute=600), 600)  # buckets are per tenant
        await limiter.check(tenant("huge", tokens_per_minute=100), 10_000)  # capped at the bucket size

    asyncio.run(go())


def test_a_refused_request_charges_neither_bucket(redis_server):
    async def go():
        limiter = patient(redis_server.url)
        who = tenant("both", requests_per_second=1, burst=3, tokens_per_minute=60)
        await limiter.check(who, 50)
        for _ in range(3):
            with pytest.raises(Overloaded):
                await limiter.check(who, 50)  # tokens short; the request bucket must not be drained
        await limiter.check(who, 5)
        await limiter.check(who, 1)  # third request of the burst of 3

    asyncio.run(go())


def test_two_gateways_share_one_bucket(redis_server):
    async def go():
        first, second = patient(redis_server.url), patient(redis_server.url)
        who = tenant("shared", requests_per_second=1, burst=6)
        ok_a, _ = await admitted(first, who, 4)
        ok_b, refused_b = await admitted(second, who, 4)
        assert ok_a == 4 and ok_b == 2 and len(refused_b) == 2
        ok_a, _ = await admitted(first, who, 1)
        assert ok_a == 0

    asyncio.run(go())


def test_concurrent_checks_never_overspend(redis_server):
    async def go():
        # About the atomicity of concurrent charges in Redis: 40 cold connections on a loaded host need the time.
        limiters = [patient(redis_server.url) for _ in range(4)]
        who = tenant("race", requests_per_second=0.01, burst=10)
        results = await asyncio.gather(*(limiters[i % 4].check(who) for i in range(40)), return_exceptions=True)
        assert sum(limiter.stats.local_checks for limiter in limiters) == 0, "every check must be decided by Redis"
        admitted = [r for r in results if not isinstance(r, BaseException)]
        assert len(admitted) == 10 and admitted == [0] * 10, "ten admitted, each charged no tokens"
        assert all(isinstance(r, Overloaded) for r in results if isinstance(r, BaseException))

    asyncio.run(go())


def test_redis_down_falls_back_to_local_buckets_without_errors(redis_server):
    async def go():
        limiter = RateLimiter(ratelimit.connect(redis_server.url))
        who = tenant("outage", requests_per_second=1, burst=3)
        await limiter.check(who)
        redis_server.stop()
        started = time.monotonic()
        ok, refused = await admitted(limiter, who, 6)
        assert time.monotonic() - started < 2.0, "an outage must cost at most a short timeout per check"
        assert ok == 3 and len(refused) == 3  # the local bucket limits (fresh, so the full burst)
        assert all(0 < r.retry_after <= 1.0 for r in refused)
        assert limiter.stats.redis_errors >= 1 and limiter.stats.local_checks == 6
        assert limiter.breaker.opened_at is not None  # the circuit is open: Redis is skipped for a while

    asyncio.run(go())


def test_redis_paused_times_out_quickly_and_recovers(redis_server):
    async def go():
        limiter = RateLimiter(ratelimit.connect(redis_server.url, timeout=0.1), timeout=0.1)
        limiter.breaker.cooldown = 0.2
        who = tenant("paused", requests_per_second=100, burst=100)
        await limiter.check(who)
        base = limiter.stats.local_checks  # 0, unless that first check (a new connection) overran 100 ms
        redis_server.pause()
        try:
            started = time.monotonic()
            for _ in range(5):
                await limiter.check(who)
            assert time.monotonic() - started < 2.0
            assert limiter.stats.local_checks - base == 5
        finally:
            redis_server.resume()
        # After the cooldown a probe goes to Redis; on a loaded host its reconnect can overrun 100 ms and reopen the
        # circuit for another cooldown, so allow a few.
        for _ in range(20):
            await asyncio.sleep(0.3)
            before = limiter.stats.local_checks
            await limiter.check(who)
            await limiter.check(who)
            if limiter.stats.local_checks == before:
                break
        else:
            raise AssertionError("never back on Redis after the cooldown")

    asyncio.run(go())


def test_no_redis_configured_uses_local_buckets():
    async def go():
        limiter = RateLimiter(None)
        ok, refused = await admitted(limiter, tenant("local", requests_per_second=2), 4)
        assert ok == 2 and len(refused) == 2
        await limiter.check(tenant("unlimited"), 10**9)  # no limits: nothing to check

    asyncio.run(go())


def test_local_buckets_refill_with_time():
    now = [0.0]
    local = LocalBuckets(clock=lambda: now[0])
    wanted = buckets(tenant("t", requests_per_second=2, burst=2), 0)
    assert local.take(wanted) == (True, 0.0) and local.take(wanted) == (True, 0.0)
    allowed, wait = local.take(wanted)
    assert not allowed and wait == pytest.approx(0.5)
    now[0] = 0.5
    assert local.take(wanted)[0]


def test_token_estimate_is_prompt_chars_over_four_plus_max_tokens():
    work = worker_pb2.GenerationWork(prompt=common_pb2.Prompt(text="x" * 40),
                                     sampling=common_pb2.SamplingParams(max_tokens=20))
    assert estimate_tokens(work) == 10 + 1 + 20
    assert estimate_tokens(worker_pb2.GenerationWork()) == 1 + 128, "an unset max_tokens counts the contract's 128"


def test_settling_refunds_a_short_answer_and_charges_a_long_one_into_debt(redis_server):
    async def go():
        limiter = patient(redis_server.url)
        client = limiter.redis
        who = tenant("settle", tokens_per_minute=60)  # refills 1 token per second
        charged = await limiter.check(who, 40)
        assert charged == 40
        await limiter.settle(who, charged, 10)  # used less: 30 back
        level = float(await client.hget("moemesh:rl:{settle}:tok", "tokens"))
        assert 49 <= level <= 51, f"after a refund the bucket holds about 50, not {level}"
        charged = await limiter.check(who, 20)
        await limiter.settle(who, charged, 100)  # used far more than estimated: the bucket goes into debt
        level = float(await client.hget("moemesh:rl:{settle}:tok", "tokens"))
        assert -52 <= level <= -48, f"the whole usage is charged, past empty: {level}"
        with pytest.raises(Overloaded) as refused:
            await limiter.check(who, 1)
        assert refused.value.retry_after > 45, "a tenant in debt waits until it is paid off"
        assert await client.pttl("moemesh:rl:{settle}:tok") > 100_000, "the debt is remembered until refilled"
        await client.aclose()

    asyncio.run(go())


def test_settling_without_redis_uses_the_local_buckets():
    async def go():
        limiter = RateLimiter(None)
        who = tenant("local-settle", tokens_per_minute=60)
        await limiter.settle(who, await limiter.check(who, 60), 120)
        with pytest.raises(Overloaded):
            await limiter.check(who, 1)

    asyncio.run(go())
