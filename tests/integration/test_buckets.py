"""Token buckets in Redis (cache/buckets.py) against a real redis-server: all-or-nothing charges and the fallback."""

from __future__ import annotations

import pytest

from moemesh.cache.buckets import Bucket, TokenBuckets
from moemesh.cache.client import connect_without_retries
from tests.support.redis_server import RedisServer


@pytest.fixture
def server():
    srv = RedisServer()
    yield srv
    srv.stop()


def pair(cost_a: float, cost_b: float) -> list[Bucket]:
    return [Bucket("moemesh:test:{t}:a", 10.0, 1.0, cost_a), Bucket("moemesh:test:{t}:b", 10.0, 1.0, cost_b)]


async def test_a_request_is_charged_in_every_bucket_or_in_none(server):
    store = TokenBuckets(connect_without_retries(server.url, 0.5), timeout=0.5)
    assert await store.take(pair(4, 9)) == (True, 0.0)
    allowed, wait = await store.take(pair(4, 4))
    assert not allowed and 2.5 < wait <= 3.0, "b holds ~1 of the 4 asked: ~3 s at 1 token/s"
    assert (await store.take(pair(5, 1)))[0], "the refusal charged nothing: a still holds 6"
    assert store.stats.redis_errors == 0 and store.stats.local_checks == 0


async def test_two_stores_on_one_redis_share_the_buckets(server):
    first = TokenBuckets(connect_without_retries(server.url, 0.5), timeout=0.5)
    second = TokenBuckets(connect_without_retries(server.url, 0.5), timeout=0.5)
    assert (await first.take(pair(8, 0)))[0]
    assert not (await second.take(pair(8, 0)))[0], "the second gateway sees what the first spent"


async def test_without_redis_the_same_buckets_are_kept_in_process(server):
    store = TokenBuckets(connect_without_retries(server.url, 0.1), timeout=0.1)
    server.stop()
    assert (await store.take(pair(6, 0)))[0]
    assert not (await store.take(pair(6, 0)))[0], "the local bucket enforces the same limit"
    assert store.stats.redis_errors >= 1 and store.stats.local_checks == 2
