"""The embedding cache: one Redis entry per (scope, model, revision, normalize, text), and the entry format.

The scope is the tenant's cache scope (see `gateway/tenants.py`): a tenant
never reads, nor learns from a hit's `cached_tokens`, what another tenant
embedded unless the operator put them in one scope.

An entry is a little-endian uint32 token count followed by the float32
vector. A batch reads all of its inputs in one MGET and computes only the
missing ones; an entry of the wrong size for the model is never used. Redis
is never needed for correctness: calls run under the cache's `RedisGuard`,
and any failure counts as a miss (reads) or is dropped (writes).
"""

from __future__ import annotations

import struct
import time

import numpy as np
import redis.asyncio as aioredis

from moemesh.cache.guard import REDIS_UNAVAILABLE, RedisGuard
from moemesh.cache.keys import digest_of_parts
from moemesh.cache.stats import CacheStats

FORMAT_VERSION = "v1"  # part of every key: bump when the entry layout changes
_COUNT = struct.Struct("<I")  # the entry's header: the input's token count


def pack_embedding(vector: np.ndarray, token_count: int) -> bytes:
    """An embedding cache entry: uint32 token count, then the float32 vector."""
    return _COUNT.pack(token_count) + np.ascontiguousarray(vector, dtype="<f4").tobytes()


def unpack_embedding(raw: bytes) -> tuple[np.ndarray, int]:
    """The vector (a read-only view of `raw`) and token count of an entry written by `pack_embedding`."""
    (count,) = _COUNT.unpack_from(raw)
    return np.frombuffer(raw, dtype="<f4", offset=_COUNT.size), count


def entry_size(dimensions: int) -> int:
    """Bytes of a well-formed entry for a model of `dimensions`."""
    return _COUNT.size + 4 * dimensions


class EmbeddingCache:
    """Vectors per (scope, model, revision, normalize, text) in Redis, in the `pack_embedding` format."""

    def __init__(self, client: aioredis.Redis | None, ttl: float = 86400.0) -> None:
        self.client = client
        self.ttl = ttl
        self.stats = CacheStats()
        self.guard = RedisGuard("embedding cache", stats=self.stats)
        self.breaker = self.guard.breaker

    @staticmethod
    def key(model: str, revision: str, normalize: bool, text: str, *, scope: str = "") -> str:
        """The Redis key of one input's vector in `scope` ("": no tenant's; the gateway always names one).

        Every part is hashed length-prefixed: no ':' or NUL inside a scope or id makes two inputs share a key.
        """
        digest = digest_of_parts(FORMAT_VERSION, scope, model, revision, str(int(normalize)), text)
        return f"moemesh:emb:{FORMAT_VERSION}:{digest.hexdigest()}"

    async def get_many(self, keys: list[str], dimensions: int) -> list[bytes | None]:
        """Stored entries of the right size for `dimensions`, or None, per key; one round trip."""
        if self.client is None or not keys:
            self.stats.bypasses += len(keys)
            return [None] * len(keys)
        start = time.perf_counter()
        raws = await self.guard.run(self.client.mget, keys, weight=len(keys), what="lookup")
        if raws is REDIS_UNAVAILABLE:
            return [None] * len(keys)
        self.stats.lookup_seconds.append(time.perf_counter() - start)
        return [self._checked(raw, dimensions) for raw in raws]

    async def put_many(self, items: dict[str, bytes]) -> None:
        """Store entries in one pipelined round trip (errors are counted, never raised)."""
        if self.client is None or not items:
            return
        if await self.guard.run(self._write, items, weight=0, what="store") is not REDIS_UNAVAILABLE:
            self.stats.stores += len(items)
            self.stats.bytes_written += sum(len(v) for v in items.values())

    async def _write(self, items: dict[str, bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, value, ex=int(self.ttl))
        await pipe.execute()

    def _checked(self, raw: bytes | None, dimensions: int) -> bytes | None:
        """`raw` when it is a well-formed entry for the model (a hit), else None (a miss)."""
        if raw is None or len(raw) != entry_size(dimensions):
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += len(raw)
        return raw
