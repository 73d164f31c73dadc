"""The gateway's Redis caches: whole answers of deterministic requests, and embedding vectors.

Response cache. Only requests whose output is fully determined by their
inputs are cached: greedy decoding, or sampling with a seed. The key hashes
a format version, the tenant scope, the model id and revision, the prompt
(text, chat messages or token ids) and every sampling field that changes the
output; two tenants never share an entry unless the operator puts them in
one scope. A hit returns the stored answer, as one event, without touching the
scheduler.

The hottest answers are also kept in a small in-process LRU, so a repeated
hit costs no Redis round trip.

Single-flight: while a request is being generated, identical requests to
the same gateway join it and stream the same events as they are produced,
so a burst of the same question costs one generation.

Embedding cache: one entry per (model, revision, normalize, text); a batch
reads all of its inputs in one MGET and computes only the missing ones.

Redis is never needed for correctness: every call has a short timeout, a
circuit breaker skips Redis after repeated failures, and any failure counts
as a miss (reads) or is dropped (writes).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from moemesh.cache.kv_tier import RECENT_LOOKUPS, CircuitBreaker
from moemesh.v1 import common_pb2, generation_pb2, worker_pb2

FORMAT_VERSION = "v1"


@dataclass
class CacheStats:
    """Counters for one cache tier."""

    hits: int = 0
    misses: int = 0
    bypasses: int = 0  # not cacheable, cache control said no, or the circuit was open
    errors: int = 0
    stores: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    joined: int = 0  # single-flight followers (response cache)
    local_hits: int = 0  # hits served from the gateway's own memory
    # recent lookup latencies, for the p50 gauge
    lookup_seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=RECENT_LOOKUPS))


def is_deterministic(sampling: common_pb2.SamplingParams, model_defaults_greedy: bool = False) -> bool:
    """Greedy (temperature 0) or seeded sampling: the same inputs give the same output."""
    if sampling.HasField("seed"):
        return True
    if sampling.HasField("temperature"):
        return sampling.temperature == 0.0
    return model_defaults_greedy


def response_key(scope: str, model: str, revision: str, request: generation_pb2.GenerateRequest) -> str:
    """Cache key of a request: everything that changes the answer, hashed."""
    digest = hashlib.sha256()
    for part in (FORMAT_VERSION, scope, model, revision):
        digest.update(part.encode() + b"\0")
    digest.update(request.prompt.SerializeToString(deterministic=True))
    digest.update(b"\0")
    digest.update(request.sampling.SerializeToString(deterministic=True))
    return f"moemesh:resp:{FORMAT_VERSION}:{digest.hexdigest()}"


class _Flight:
    """One generation in progress that identical requests may follow."""

    def __init__(self) -> None:
        self.events: list[worker_pb2.RequestEvent] = []
        self.done = False
        self.failed: BaseException | None = None
        self.changed = asyncio.Condition()

    async def publish(self, event: worker_pb2.RequestEvent | None, error: BaseException | None = None) -> None:
        async with self.changed:
            if event is not None:
                self.events.append(event)
            if error is not None or event is None or event.finish_reason:
                self.done, self.failed = True, error
            self.changed.notify_all()

    async def follow(self) -> AsyncIterator[worker_pb2.RequestEvent]:
        index = 0
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda seen=index: len(self.events) > seen or self.done)
                pending, done, failed = self.events[index:], self.done, self.failed
            for event in pending:
                yield event
            index += len(pending)
            if done and index >= len(self.events):
                if failed is not None:
                    raise failed
                return


def merge_events(events: list[worker_pb2.RequestEvent]) -> worker_pb2.RequestEvent:
    """A finished answer as one event (joined text, tokens and logprobs; the last event's finish and usage)."""
    merged = worker_pb2.RequestEvent(request_id=events[-1].request_id, finish_reason=events[-1].finish_reason)
    merged.text = "".join(e.text for e in events)
    for event in events:
        merged.token_ids.extend(event.token_ids)
        merged.logprobs.extend(event.logprobs)
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
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, raw: bytes) -> None:
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
        self.breaker = CircuitBreaker()
        self.stats = CacheStats()
        self.local = LocalAnswers(local_bytes, ttl) if local_bytes else None
        self._flights: dict[str, _Flight] = {}

    async def get(self, key: str) -> list[worker_pb2.RequestEvent] | None:
        """The stored events of `key`, or None (a miss, or Redis unavailable)."""
        raw = self.local.get(key) if self.local is not None else None
        if raw is not None:
            self.stats.hits += 1
            self.stats.local_hits += 1
            return list(worker_pb2.EventBatch.FromString(raw).events)
        if self.client is None or not self.breaker.allow():
            self.stats.bypasses += 1
            return None
        start = time.perf_counter()
        try:
            raw = await self.client.get(key)
        except (aioredis.RedisError, OSError):
            self.stats.errors += 1
            self.breaker.failure()
            return None
        self.breaker.success()
        self.stats.lookup_seconds.append(time.perf_counter() - start)
        if raw is None:
            self.stats.misses += 1
            return None
        batch = worker_pb2.EventBatch()
        try:
            batch.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a corrupt entry is a miss
            self.stats.errors += 1
            return None
        if not batch.events or not batch.events[-1].finish_reason:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += len(raw)
        if self.local is not None:
            self.local.put(key, raw)
        return list(batch.events)

    async def put(self, key: str, events: list[worker_pb2.RequestEvent]) -> None:
        """Store a finished answer (errors are counted, never raised)."""
        if self.client is None or not events or not self.breaker.allow():
            return
        raw = worker_pb2.EventBatch(events=[merge_events(events)]).SerializeToString()
        if len(raw) > self.max_entry_bytes:
            self.stats.bypasses += 1
            return
        if self.local is not None:
            self.local.put(key, raw)
        try:
            await self.client.set(key, raw, ex=int(self.ttl))
        except (aioredis.RedisError, OSError):
            self.stats.errors += 1
            self.breaker.failure()
            return
        self.breaker.success()
        self.stats.stores += 1
        self.stats.bytes_written += len(raw)

    async def serve(
        self,
        key: str,
        generate: Callable[[], AsyncIterator[worker_pb2.RequestEvent]],
        read: bool = True,
        write: bool = True,
    ) -> AsyncIterator[tuple[worker_pb2.RequestEvent, bool]]:
        """Events for a cacheable request, each with whether it came from the cache.

        A stored answer is replayed; else an identical request in progress on
        this gateway is followed; else `generate()` runs and its finished answer
        is stored.
        """
        if read:
            stored = await self.get(key)
            if stored is not None:
                for event in stored:
                    yield event, True
                return
            flight = self._flights.get(key)
            if flight is not None:
                self.stats.joined += 1
                async for event in flight.follow():
                    yield event, False
                return
        flight = _Flight()
        self._flights[key] = flight
        events: list[worker_pb2.RequestEvent] = []
        try:
            async for event in generate():
                events.append(event)
                await flight.publish(event)
                yield event, False
        except BaseException as exc:
            await flight.publish(None, exc)
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not flight.done:  # the leader's caller went away early: followers must not hang
                await flight.publish(None, asyncio.CancelledError("the request being followed was cancelled"))
        if write and events and events[-1].finish_reason in (common_pb2.FINISH_REASON_STOP,
                                                              common_pb2.FINISH_REASON_LENGTH):
            await self.put(key, events)


class EmbeddingCache:
    """Vectors per (model, revision, normalize, text) in Redis: a uint32 token count, then float32 bytes."""

    def __init__(self, client: aioredis.Redis | None, ttl: float = 86400.0) -> None:
        self.client = client
        self.ttl = ttl
        self.breaker = CircuitBreaker()
        self.stats = CacheStats()

    @staticmethod
    def key(model: str, revision: str, normalize: bool, text: str) -> str:
        digest = hashlib.sha256(f"{FORMAT_VERSION}\0{model}\0{revision}\0{int(normalize)}\0".encode())
        digest.update(text.encode("utf-8", "surrogatepass"))
        return f"moemesh:emb:{FORMAT_VERSION}:{digest.hexdigest()}"

    async def get_many(self, keys: list[str], dimensions: int) -> list[bytes | None]:
        """Stored entries (4-byte count + float32 vector of the right size) or None, per key; one round trip."""
        if self.client is None or not keys or not self.breaker.allow():
            self.stats.bypasses += len(keys)
            return [None] * len(keys)
        start = time.perf_counter()
        try:
            raws = await self.client.mget(keys)
        except (aioredis.RedisError, OSError):
            self.stats.errors += 1
            self.breaker.failure()
            return [None] * len(keys)
        self.breaker.success()
        self.stats.lookup_seconds.append(time.perf_counter() - start)
        found = []
        for raw in raws:
            if raw is not None and len(raw) == 4 * dimensions + 4:
                self.stats.hits += 1
                self.stats.bytes_read += len(raw)
                found.append(raw)
            else:
                self.stats.misses += 1
                found.append(None)
        return found

    async def put_many(self, items: dict[str, bytes]) -> None:
        if self.client is None or not items or not self.breaker.allow():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value, ex=int(self.ttl))
            await pipe.execute()
        except (aioredis.RedisError, OSError):
            self.stats.errors += 1
            self.breaker.failure()
            return
        self.breaker.success()
        self.stats.stores += len(items)
        self.stats.bytes_written += sum(len(v) for v in items.values())
