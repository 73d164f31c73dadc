"""The response cache: whole answers of deterministic requests in Redis, with single-flight of identical ones.

The caller decides which requests may be cached (the gateway caches only
those whose output is fully determined by their inputs: greedy decoding, or
sampling with a seed). The key hashes a format version, the tenant scope,
the model id and revision, the prompt (text, chat messages or token ids) and
every sampling field that changes the output; two tenants never share an
entry unless the operator puts them in one scope. A hit returns the stored
answer, as one event, without touching the scheduler. Only finished answers
(stop or length) are stored.

The hottest answers are also kept in a small in-process LRU, so a repeated
hit costs no Redis round trip.

Single-flight: while a request is being generated, identical requests to
the same gateway join it and stream the same events as they are produced,
so a burst of the same question costs one generation. The generation belongs
to the flight, not to the request that started it: it runs in a task of its
own, every request (the first one too) reads it, and it is cancelled only
when the last reader has gone. So a caller that goes away ends nobody else's
stream (it once left the others waiting until their deadlines).

The embedding cache lives in `cache/embeddings.py` (re-exported here).

Redis is never needed for correctness: every call runs under the cache's
`RedisGuard` (a short timeout, and a circuit breaker that skips Redis after
repeated failures), and any failure counts as a miss (reads) or is dropped
(writes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from moemesh.cache.embeddings import EmbeddingCache
from moemesh.cache.guard import REDIS_UNAVAILABLE, RedisGuard
from moemesh.cache.keys import digest_of_parts
from moemesh.cache.stats import CacheStats
from moemesh.services.core.tracing import span
from moemesh.v1 import common_pb2, generation_pb2, worker_pb2

__all__ = ["CacheStats", "EmbeddingCache", "LocalAnswers", "ResponseCache", "merge_events", "response_key"]

FORMAT_VERSION = "v1"
STORED_FINISHES = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)  # complete answers only


def response_key(scope: str, model: str, revision: str, request: generation_pb2.GenerateRequest) -> str:
    """Cache key of a request: everything that changes the answer, hashed part by part (length-prefixed, so a
    ':' or NUL inside a scope or id cannot make two requests' parts run together into one key)."""
    digest = digest_of_parts(FORMAT_VERSION, scope, model, revision,
                             request.prompt.SerializeToString(deterministic=True),
                             request.sampling.SerializeToString(deterministic=True))
    return f"moemesh:resp:{FORMAT_VERSION}:{digest.hexdigest()}"


class _Flight:
    """One generation in progress that identical requests follow, and how many of them do. Its events are
    published and read on the event loop alone: a list and the futures of the readers waiting for more, no lock
    (a Condition cost about 2 µs more an event)."""

    def __init__(self) -> None:
        self.events: list[worker_pb2.RequestEvent] = []
        self.done = False
        self.failed: BaseException | None = None
        self.readers = 0
        self.task: asyncio.Task | None = None  # the generation (ResponseCache._fly)
        self._waiting: list[asyncio.Future] = []  # readers that have read every event so far

    def publish(self, event: worker_pb2.RequestEvent | None, error: BaseException | None = None) -> None:
        """Add an event (None: the end), or end with `error`; wake the waiting readers."""
        if event is not None:
            self.events.append(event)
        if error is not None or event is None or event.finish_reason:
            self.done, self.failed = True, error
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)

    async def follow(self) -> AsyncIterator[worker_pb2.RequestEvent]:
        """Every event from the first, as they are published; the flight's error at its end, if it failed."""
        index = 0
        while True:
            while index < len(self.events):
                index += 1
                yield self.events[index - 1]
            if self.done:
                if self.failed is not None:
                    raise self.failed
                return
            future = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            await future


def merge_events(events: list[worker_pb2.RequestEvent]) -> worker_pb2.RequestEvent:
    """A finished answer as one event (joined text, tokens and logprobs, prompt logprobs; the last event's finish
    and usage)."""
    merged = worker_pb2.RequestEvent(request_id=events[-1].request_id, finish_reason=events[-1].finish_reason)
    merged.text = "".join(e.text for e in events)
    for event in events:
        merged.token_ids.extend(event.token_ids)
        merged.logprobs.extend(event.logprobs)
        merged.prompt_logprobs.extend(event.prompt_logprobs)
    if events[-1].HasField("usage"):
        merged.usage.CopyFrom(events[-1].usage)
    return merged


class LocalAnswers:
    """A small in-process LRU in front of Redis for the hottest answers.

    Safe without invalidation: an entry's key covers everything that decides
    the answer (model revision included), so a stored answer never changes;
    entries still expire with the same TTL as in Redis.
    """

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.size = 0
        self._entries: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()

    def get(self, key: str) -> bytes | None:
        """The stored answer of `key`, unless absent or expired (a hit makes it the most recent)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, raw: bytes) -> None:
        """Keep an answer (one larger than an eighth of the budget is not kept), evicting the least recent."""
        if len(raw) > self.max_bytes // 8:
            return
        self._drop(key)
        self._entries[key] = (time.monotonic() + self.ttl, raw)
        self.size += len(raw)
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(entry[1])


class ResponseCache:
    """Answers of deterministic requests in Redis, plus single-flight of identical ones in progress."""

    def __init__(self, client: aioredis.Redis | None, ttl: float = 3600.0, max_entry_bytes: int = 1 << 20,
                 local_bytes: int = 32 << 20) -> None:
        self.client = client
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.stats = CacheStats()
        self.guard = RedisGuard("response cache", stats=self.stats)
        self.breaker = self.guard.breaker
        self.local = LocalAnswers(local_bytes, ttl) if local_bytes else None
        self._flights: dict[str, _Flight] = {}

    async def get(self, key: str) -> list[worker_pb2.RequestEvent] | None:
        """The stored events of `key`, or None (a miss, or Redis unavailable)."""
        raw = self.local.get(key) if self.local is not None else None
        if raw is not None:
            self.stats.hits += 1
            self.stats.local_hits += 1
            return list(worker_pb2.EventBatch.FromString(raw).events)
        if self.client is None:
            self.stats.bypasses += 1
            return None
        start = time.perf_counter()
        raw = await self.guard.run(self.client.get, key, what="lookup")
        if raw is REDIS_UNAVAILABLE:
            return None
        self.stats.lookup_seconds.append(time.perf_counter() - start)
        events = self._answer(raw)
        if events is not None and self.local is not None:
            self.local.put(key, raw)
        return events

    def _answer(self, raw: bytes | None) -> list[worker_pb2.RequestEvent] | None:
        """The events of a stored entry (a hit), or None when absent, corrupt or unfinished (counted)."""
        if raw is None:
            self.stats.misses += 1
            return None
        batch = worker_pb2.EventBatch()
        try:
            batch.ParseFromString(raw)
        except Exception:  # a corrupt entry is a miss
            self.stats.errors += 1
            return None
        if not batch.events or not batch.events[-1].finish_reason:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += len(raw)
        return list(batch.events)

    async def put(self, key: str, events: list[worker_pb2.RequestEvent]) -> None:
        """Store a finished answer (errors are counted, never raised)."""
        if self.client is None or not events:
            return
        raw = worker_pb2.EventBatch(events=[merge_events(events)]).SerializeToString()
        if len(raw) > self.max_entry_bytes:
            self.stats.bypasses += 1
            return
        if self.local is not None:
            self.local.put(key, raw)
        if await self.guard.run(self._write, key, raw, weight=0, what="store") is not REDIS_UNAVAILABLE:
            self.stats.stores += 1
            self.stats.bytes_written += len(raw)

    async def _write(self, key: str, raw: bytes) -> None:
        await self.client.set(key, raw, ex=int(self.ttl))

    async def serve(
        self,
        key: str,
        generate: Callable[[], AsyncIterator[worker_pb2.RequestEvent]],
        read: bool = True,
        write: bool = True,
    ) -> AsyncIterator[tuple[worker_pb2.RequestEvent, bool]]:
        """Events for a cacheable request, each with whether it came from the cache.

        A stored answer is replayed; else an identical request in progress on
        this gateway is followed; else `generate()` runs in a flight of its own
        (which identical requests then follow) and its finished answer is
        stored. Closing this leaves the flight; the last reader to leave cancels
        the generation.
        """
        if read:
            with span("cache lookup", {"moemesh.cache.tier": "response"}) as lookup:
                stored = await self.get(key)
                if lookup is not None:
                    lookup.set_attribute("moemesh.cache.hit", stored is not None)
            if stored is not None:
                for event in stored:
                    yield event, True
                return
        flight = self._flights.get(key) if read else None
        if flight is not None:
            self.stats.joined += 1
        else:
            flight = _Flight()  # a no-cache request (read False) generates afresh; later requests may join it
            self._flights[key] = flight
            flight.task = asyncio.get_running_loop().create_task(self._fly(key, flight, generate, write))
        flight.readers += 1
        try:
            async for event in flight.follow():
                yield event, False
            await asyncio.wait({flight.task})  # its answer stored: an identical request after this one is a hit
        finally:
            flight.readers -= 1
            if not flight.readers and not flight.done:  # the last reader went away: nobody wants the rest
                if self._flights.get(key) is flight:  # and nobody may join it while it is cancelled
                    del self._flights[key]
                flight.task.cancel()

    async def _fly(self, key: str, flight: _Flight, generate: Callable[[], AsyncIterator[worker_pb2.RequestEvent]],
                   write: bool) -> None:
        """Run a flight's generation, publishing every event; store its finished answer."""
        events: list[worker_pb2.RequestEvent] = []
        try:
            async with contextlib.aclosing(generate()) as stream:  # leaving early cancels it upstream
                async for event in stream:
                    events.append(event)
                    flight.publish(event)
        except asyncio.CancelledError:
            flight.publish(None, asyncio.CancelledError("every request following the generation went away"))
            raise
        except Exception as exc:  # every reader gets the generation's error
            flight.publish(None, exc)
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.done:  # it ended without a last event: so do its readers (the caller decides what that is)
                flight.publish(None)
        if write and events and events[-1].finish_reason in STORED_FINISHES:
            await self.put(key, events)
