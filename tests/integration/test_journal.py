"""The stream journal against a real redis-server: claims, replay from an offset, errors, and Redis outages."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from moemesh.cache.journal import Journal
from moemesh.services.core.errors import InvalidRequest, Overloaded, Unavailable
from moemesh.v1 import common_pb2, worker_pb2
from tests.support.redis_server import RedisServer

FP = "1" * 32  # a request's fingerprint (gateway.generation.fingerprint): the same for every call here


@pytest.fixture
def server():
    srv = RedisServer()
    yield srv
    srv.stop()


def journal_on(server: RedisServer, timeout: float = 5.0) -> Journal:
    return Journal(aioredis.from_url(server.url, socket_timeout=timeout, socket_connect_timeout=timeout), block_ms=100)


def answer(*pieces: str) -> list[worker_pb2.RequestEvent]:
    events = [worker_pb2.RequestEvent(request_id="r", text=p, token_ids=[i]) for i, p in enumerate(pieces)]
    events[-1].finish_reason = common_pb2.FINISH_REASON_STOP
    return events


def generation(events: list[worker_pb2.RequestEvent], pause: float = 0.01, error: Exception | None = None):
    async def generate():
        for event in events:
            await asyncio.sleep(pause)
            yield event
        if error is not None:
            raise error

    return generate


async def test_one_claim_generates_and_every_reader_follows_from_its_offset(server):
    journal = journal_on(server)
    key = Journal.key("acme", "po-1")
    assert await journal.claim(key, FP) is True
    assert await journal.claim(key, FP) is False, "a second call follows instead of generating"
    journal.start(key, generation(answer("a", "b", "c")))
    whole, tail = await asyncio.gather(_texts(journal.follow(key)), _texts(journal.follow(key, start=2)))
    assert whole == ["a", "b", "c"] and tail == ["c"]
    assert await journal.claim(key, FP) is False, "a finished journal is replayed, not generated again"
    assert await _texts(journal.follow(key, start=1)) == ["b", "c"]


async def test_an_id_whose_journal_holds_another_request_is_refused_while_running_and_once_finished(server):
    """An id reused for a different request would be answered with the first one's events: refused instead."""
    journal = journal_on(server)
    key = Journal.key("acme", "po:7/ä")
    assert await journal.claim(key, FP) is True
    for state in ("running", "finished"):
        with pytest.raises(InvalidRequest) as caught:
            await journal.claim(key, "2" * 32)
        assert caught.value.field == "request_id", state
        assert str(caught.value).startswith("request_id: 'po:7/ä' names another request"), caught.value
        assert await journal.claim(key, FP) is False, f"the same request follows the journal ({state})"
        if state == "running":
            journal.start(key, generation(answer("a")))
            assert await _texts(journal.follow(key)) == ["a"]
    await journal.client.set(Journal.key("acme", "po-8") + ":owner", "a-token-of-an-older-gateway", ex=60)
    assert await journal.claim(Journal.key("acme", "po-8"), "2" * 32) is False, "a claim without a fingerprint: follow"


async def test_journals_are_per_tenant(server):
    assert Journal.key("acme", "po-1") != Journal.key("globex", "po-1")
    journal = journal_on(server)
    assert await journal.claim(Journal.key("acme", "po-1"), FP) is True
    assert await journal.claim(Journal.key("globex", "po-1"), FP) is True


async def test_a_failed_generation_ends_every_reader_with_its_error(server):
    journal = journal_on(server)
    key = Journal.key("acme", "po-2")
    assert await journal.claim(key, FP) is True
    journal.start(key, generation(answer("a", "b")[:1], error=Overloaded("busy", retry_after=2.0)))
    with pytest.raises(Overloaded):
        await _texts(journal.follow(key))


async def test_redis_down_means_no_journal_quickly_and_the_circuit_opens(server):
    journal = journal_on(server, timeout=0.2)
    server.stop()
    started = time.monotonic()
    for i in range(5):
        assert await journal.claim(Journal.key("acme", f"po-{i}"), FP) is None, "no Redis: serve unjournaled"
    assert time.monotonic() - started < 3.0
    assert journal.breaker.opened_at is not None, "repeated failures open the circuit: later claims skip Redis"


async def test_a_reader_whose_redis_went_away_gets_a_retryable_error(server):
    journal = journal_on(server, timeout=0.2)
    key = Journal.key("acme", "po-3")
    assert await journal.claim(key, FP) is True
    server.stop()
    with pytest.raises(Unavailable):
        await _texts(journal.follow(key))


async def _texts(events) -> list[str]:
    return [e.text async for e in events]


def test_tenant_and_request_ids_with_separators_never_share_a_journal():
    assert Journal.key("a:b", "c") != Journal.key("a", "b:c")
    assert Journal.key("a", "b:owner") != Journal.key("a", "b") + ":owner", "an id cannot name another's claim"
    assert Journal.key("a%3Ab", "c") != Journal.key("a:b", "c")


async def test_a_failed_append_ends_every_reader_with_unavailable_and_stops_the_generation(server):
    journal = journal_on(server)
    key = Journal.key("acme", "po-oom")
    assert await journal.claim(key, FP) is True
    stopped = asyncio.Event()
    admin = aioredis.from_url(server.url)

    async def generate():
        try:
            for i in range(200):
                if i == 3:  # Redis starts refusing writes mid-stream
                    await admin.config_set("maxmemory", 1)
                await asyncio.sleep(0.01)
                yield worker_pb2.RequestEvent(text=f"t{i}", token_ids=[i])
            yield worker_pb2.RequestEvent(finish_reason=common_pb2.FINISH_REASON_LENGTH)
        finally:
            stopped.set()

    journal.start(key, generate)
    seen = []

    async def read():
        async for event in journal.follow(key):
            seen.append(event.text)

    with pytest.raises(Unavailable):  # within a read or two, not when the journal expires
        await asyncio.wait_for(read(), 5.0)
    assert seen == [f"t{i}" for i in range(len(seen))] and len(seen) <= 4, "no gap: what was read is a prefix"
    await asyncio.wait_for(stopped.wait(), 2.0)  # the generation was closed, not left running
    await admin.config_set("maxmemory", 0)
    assert await journal.claim(key, FP) is True, "a retry with the same id generates afresh"
    await admin.aclose()


async def test_followers_share_a_bounded_pool_and_each_reads_the_whole_stream(server):
    client = aioredis.from_url(server.url, socket_timeout=5, max_connections=4)
    journal = Journal(client, block_ms=100)
    assert journal.max_followers == 2
    key = Journal.key("acme", "po-crowd")
    assert await journal.claim(key, FP) is True
    admin = aioredis.from_url(server.url)
    baseline = len(await admin.client_list())
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, len(await admin.client_list()) - baseline)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    journal.start(key, generation(answer(*"abcdefghij"), pause=0.05))
    results = await asyncio.gather(*(_texts(journal.follow(key)) for _ in range(8)))
    watcher.cancel()
    assert all(r == list("abcdefghij") for r in results), "every follower reads every event"
    assert peak <= 4, f"the journal held {peak} connections; its pool allows 4"
    await admin.aclose()
