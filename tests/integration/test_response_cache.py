"""Response and embedding caches against a real redis-server: keys, hits, single-flight, isolation, faults."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from moemesh.cache.response import EmbeddingCache, LocalAnswers, ResponseCache, response_key
from moemesh.gateway.caches import is_deterministic
from moemesh.v1 import common_pb2, generation_pb2, worker_pb2
from tests.support.redis_server import RedisServer


@pytest.fixture
def server():
    srv = RedisServer()
    yield srv
    srv.stop()


def request(text: str = "hello", **sampling) -> generation_pb2.GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    return generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=text),
                                          sampling=common_pb2.SamplingParams(max_tokens=4, **sampling))


def answer(*pieces: str) -> list[worker_pb2.RequestEvent]:
    events = [worker_pb2.RequestEvent(request_id="r", text=p, token_ids=[i]) for i, p in enumerate(pieces)]
    events[-1].finish_reason = common_pb2.FINISH_REASON_LENGTH
    return events


class FakeGeneration:
    """Counts generations; yields its events with a pause between them."""

    def __init__(self, events: list[worker_pb2.RequestEvent], pause: float = 0.01) -> None:
        self.events, self.pause, self.calls = events, pause, 0

    async def __call__(self):
        self.calls += 1
        for event in self.events:
            await asyncio.sleep(self.pause)
            yield event


def test_only_deterministic_requests_are_cacheable():
    assert is_deterministic(common_pb2.SamplingParams(temperature=0.0))
    assert is_deterministic(common_pb2.SamplingParams(temperature=0.9, seed=3))
    assert not is_deterministic(common_pb2.SamplingParams(temperature=0.9))
    assert not is_deterministic(common_pb2.SamplingParams())  # model default: sampling
    assert is_deterministic(common_pb2.SamplingParams(), model_defaults_greedy=True)


def test_every_output_changing_input_changes_the_key():
    base = response_key("t1", "m", "r1", request())
    assert base == response_key("t1", "m", "r1", request())
    variants = [
        response_key("t2", "m", "r1", request()),  # another tenant
        response_key("t1", "m2", "r1", request()),  # another model
        response_key("t1", "m", "r2", request()),  # another revision
        response_key("t1", "m", "r1", request("hello!")),
        response_key("t1", "m", "r1", request(top_k=5)),
        response_key("t1", "m", "r1", request(stop=["x"])),
        response_key("t1", "m", "r1", request(temperature=0.5, seed=1)),
    ]
    assert len({base, *variants}) == len(variants) + 1


async def test_a_stored_answer_is_replayed_without_generating(server):
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2))
    generation = FakeGeneration(answer("a", "b"))
    key = response_key("t", "m", "r", request())
    first = [(e.text, cached) async for e, cached in cache.serve(key, generation)]
    second = [(e.text, cached) async for e, cached in cache.serve(key, generation)]
    assert first == [("a", False), ("b", False)] and second == [("ab", True)], "a hit replays the answer as one event"
    assert generation.calls == 1 and cache.stats.hits == 1 and cache.stats.stores == 1


async def test_cache_control_no_cache_and_no_store(server):
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2))
    generation = FakeGeneration(answer("a"))
    key = response_key("t", "m", "r", request())
    [_ async for _ in cache.serve(key, generation, read=True, write=False)]  # no-store: nothing kept
    assert await cache.get(key) is None
    [_ async for _ in cache.serve(key, generation, read=False, write=True)]  # no-cache: fresh, then kept
    assert generation.calls == 2 and await cache.get(key) is not None


async def test_tenants_never_see_each_others_answers(server):
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2))
    secret = FakeGeneration(answer("tenant A's answer"))
    [_ async for _ in cache.serve(response_key("tenant-a", "m", "r", request()), secret)]
    other = FakeGeneration(answer("tenant B's own answer"))
    got = [(e.text, cached) async for e, cached in cache.serve(response_key("tenant-b", "m", "r", request()), other)]
    assert got == [("tenant B's own answer", False)] and other.calls == 1


async def test_identical_concurrent_requests_share_one_generation(server):
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2))
    generation = FakeGeneration(answer("x", "y", "z"), pause=0.02)
    key = response_key("t", "m", "r", request())

    async def one():
        return [e.text async for e, _ in cache.serve(key, generation)]

    results = await asyncio.gather(*(one() for _ in range(5)))
    assert results == [["x", "y", "z"]] * 5
    assert generation.calls == 1 and cache.stats.joined == 4


class WatchedGeneration(FakeGeneration):
    """A FakeGeneration that records whether its stream was closed before its end (cancelled upstream)."""

    closed_early = False

    async def __call__(self):
        self.calls += 1
        sent = 0
        try:
            for event in self.events:
                await asyncio.sleep(self.pause)
                yield event
                sent += 1
        finally:
            self.closed_early = sent < len(self.events)


async def test_the_first_caller_leaving_ends_no_other_stream_and_the_last_cancels_the_generation(server):
    """The flight's generation is its own: the request that started it going away (a closed stream, a client
    gone) once left every request that had joined it waiting until its deadline."""
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2))
    generation = WatchedGeneration(answer(*"abcdefgh"), pause=0.02)
    key = response_key("t", "m", "r", request())
    first = cache.serve(key, generation)
    assert (await anext(first))[0].text == "a"
    joined = asyncio.ensure_future(asyncio.wait_for(_texts(cache.serve(key, generation)), 10))
    while not cache.stats.joined:  # past its cache lookup (a Redis round trip), following the flight
        await asyncio.sleep(0.005)
    await first.aclose()  # the first caller goes away mid-answer
    assert await joined == list("abcdefgh") and generation.calls == 1 and cache.stats.joined == 1
    assert not generation.closed_early and await cache.get(key) is not None, "run to its end, and stored"

    lonely = WatchedGeneration(answer(*"abcdefgh"), pause=0.02)
    key = response_key("t", "m", "r", request("another"))
    readers = [cache.serve(key, lonely) for _ in range(2)]
    for reader in readers:
        await anext(reader)
    for reader in readers:
        await reader.aclose()
    assert key not in cache._flights, "a flight being cancelled takes no new reader"
    await asyncio.sleep(0.1)
    assert lonely.closed_early, "with no reader left, the generation is cancelled upstream"
    assert await cache.get(key) is None
    fresh = WatchedGeneration(answer("a", "b"))
    assert await _texts(cache.serve(key, fresh)) == ["a", "b"] and fresh.calls == 1, "the next request generates anew"


async def _texts(pairs) -> list[str]:
    return [event.text async for event, _ in pairs]


async def test_unfinished_answers_are_not_stored(server):
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2))
    events = answer("a")
    events[-1].finish_reason = common_pb2.FINISH_REASON_ABORT
    key = response_key("t", "m", "r", request())
    [_ async for _ in cache.serve(key, FakeGeneration(events))]
    assert await cache.get(key) is None


async def test_redis_down_or_paused_is_a_miss_not_a_failure(server):
    # No in-process tier here: every call must go to the faulty Redis.
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.1, socket_connect_timeout=0.1), local_bytes=0)
    generation = FakeGeneration(answer("a"))
    key = response_key("t", "m", "r", request())
    server.pause()
    try:
        got = [e.text async for e, _ in cache.serve(key, generation)]
    finally:
        server.resume()
    assert got == ["a"] and cache.stats.errors >= 1
    server.stop()
    for _ in range(4):  # the breaker opens; requests keep being served
        assert [e.text async for e, _ in cache.serve(key, generation)] == ["a"]
    assert cache.breaker.opened_at is not None and cache.stats.bypasses >= 1
    server.start()
    cache.breaker.success()  # as after the cooldown's successful probe
    [_ async for _ in cache.serve(key, generation)]
    assert await cache.get(key) is not None, "the cache refills once Redis is back"


async def test_hot_answers_are_served_from_memory_and_bounded(server):
    cache = ResponseCache(aioredis.from_url(server.url, socket_timeout=0.2), local_bytes=4096)
    key = response_key("t", "m", "r", request())
    [_ async for _ in cache.serve(key, FakeGeneration(answer("a", "b")))]
    server.stop()  # Redis gone: the hot answer is still served, from memory
    assert [e.text for e in await cache.get(key)] == ["ab"] and cache.stats.local_hits == 1
    for i in range(50):  # other answers push it out: memory stays bounded
        cache.local.put(f"k{i}", b"x" * 200)
    assert cache.local.size <= 4096 and cache.local.get(key) is None


def test_local_answers_expire():
    local = LocalAnswers(max_bytes=1024, ttl=0.0)
    local.put("k", b"v")
    assert local.get("k") is None


async def test_embedding_cache_returns_hits_and_misses_in_one_round_trip(server):
    cache = EmbeddingCache(aioredis.from_url(server.url, socket_timeout=0.2))
    keys = [EmbeddingCache.key("m", "r", True, t) for t in ("a", "b", "c")]
    await cache.put_many({keys[0]: b"\0" * 12, keys[2]: b"\1" * 12})
    got = await cache.get_many(keys, dimensions=2)
    assert got == [b"\0" * 12, None, b"\1" * 12] and cache.stats.hits == 2 and cache.stats.misses == 1
    assert (await cache.get_many(keys[:1], dimensions=3)) == [None], "a wrong-sized entry is never used"
    assert EmbeddingCache.key("m", "r", False, "a") != keys[0] and EmbeddingCache.key("m", "r2", True, "a") != keys[0]
