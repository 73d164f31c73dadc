"""The stream journal against a real redis-server: claims, replay from an offset, errors, and Redis outages."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from moemesh.cache.journal import Journal
from moemesh.services.core.errors import Overloaded, Unavailable
from moemesh.v1 import common_pb2, worker_pb2
from tests.support.redis_server import RedisServer


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
    assert await journal.claim(key) is True
    assert await journal.claim(key) is False, "a second call follows instead of generating"
    journal.start(key, generation(answer("a", "b", "c")))
    whole, tail = await asyncio.gather(_texts(journal.follow(key)), _texts(journal.follow(key, start=2)))
    assert whole == ["a", "b", "c"] and tail == ["c"]
    assert await journal.claim(key) is False, "a finished journal is replayed, not generated again"
    assert await _texts(journal.follow(key, start=1)) == ["b", "c"]


async def test_journals_are_per_tenant(server):
    assert Journal.key("acme", "po-1") != Journal.key("globex", "po-1")
    journal = journal_on(server)
    assert await journal.claim(Journal.key("acme", "po-1")) is True
    assert await journal.claim(Journal.key("globex", "po-1")) is True


async def test_a_failed_generation_ends_every_reader_with_its_error(server):
    journal = journal_on(server)
    key = Journal.key("acme", "po-2")
    assert await journal.claim(key) is True
    journal.start(key, generation(answer("a", "b")[:1], error=Overloaded("busy", retry_after=2.0)))
    with pytest.raises(Overloaded):
        await _texts(journal.follow(key))


async def test_redis_down_means_no_journal_quickly_and_the_circuit_opens(server):
    journal = journal_on(server, timeout=0.2)
    server.stop()
    started = time.monotonic()
    for i in range(5):
        assert await journal.claim(Journal.key("acme", f"po-{i}")) is None, "no Redis: serve unjournaled"
    assert time.monotonic() - started < 3.0
    assert journal.breaker.opened_at is not None, "repeated failures open the circuit: later claims skip Redis"


async def test_a_reader_whose_redis_went_away_gets_a_retryable_error(server):
    journal = journal_on(server, timeout=0.2)
    key = Journal.key("acme", "po-3")
    assert await journal.claim(key) is True
    server.stop()
    with pytest.raises(Unavailable):
        await _texts(journal.follow(key))


async def _texts(events) -> list[str]:
    return [e.text async for e in events]
