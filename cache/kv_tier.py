"""The shared prefix-KV tier: full KV-cache blocks in Redis, keyed by chained block hash.

A worker whose local prefix cache misses asks Redis, in one MGET round trip,
for the blocks of the prompt's longest prefix; a worker that computed new
full blocks hands their keys and values to a background writer, so the
engine step never waits on Redis. Entries survive worker restarts and are
shared by every worker serving the same model revision.

Each entry carries a header (format version, dtype, shape, the block's token
ids and parent hash) and a CRC32 of its payload; an entry that does not
match what the reader expects in every respect is ignored and counted,
never used. Redis is never needed for correctness: every call runs under the
cache's `RedisGuard` (a short timeout, and a circuit breaker that skips the
tier for a while after repeated failures); requests are then served by
computing, as without the tier.

Size: entries expire after `ttl` seconds, and the Redis server's own
`maxmemory` policy (allkeys-lru on the embedded one) bounds the total.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
import torch

from moemesh.cache.guard import REDIS_UNAVAILABLE, CircuitBreaker, RedisGuard
from moemesh.cache.stats import RECENT_LOOKUPS, recent_latencies

__all__ = ["RECENT_LOOKUPS", "BlockSpec", "CircuitBreaker", "RedisKVTier", "TierStats", "decode_entry", "encode_entry"]

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1  # bump when the payload layout changes: old entries then never match
MAGIC = b"MMKV"
_HEADER_LEN = struct.Struct("<4sI")  # magic, header length

PendingBlock = tuple[bytes, bytes, Sequence[int], bytes]  # (hash, parent hash, token ids, payload) waiting to be written


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one model looks like; a stored entry must match it exactly."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]  # (layers, 2, block_size, n_kv, head_dim)


@dataclass
class TierStats:
    """Counters for metrics."""

    lookups: int = 0  # blocks asked for
    hits: int = 0  # blocks found and valid
    misses: int = 0  # blocks absent
    rejected: int = 0  # blocks present but corrupt or mismatched (ignored)
    errors: int = 0  # failed Redis calls
    bypassed: int = 0  # calls skipped while the circuit was open
    stored: int = 0  # blocks written
    dropped: int = 0  # blocks not written (writer queue full)
    bytes_read: int = 0
    bytes_written: int = 0
    lookup_seconds: deque[float] = field(default_factory=recent_latencies)  # recent latencies


def encode_entry(spec: BlockSpec, token_ids: Sequence[int], parent: bytes, payload: bytes) -> bytes:
    """Header + payload bytes of one block."""
    header = json.dumps({
        "v": LAYOUT_VERSION, "dtype": spec.dtype, "shape": list(spec.shape), "tokens": list(map(int, token_ids)),
        "parent": parent.hex(), "crc32": zlib.crc32(payload),
    }, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(MAGIC, len(header)) + header + payload


def decode_entry(raw: bytes, spec: BlockSpec, token_ids: Sequence[int], parent: bytes) -> bytes | None:
    """The payload of an entry that matches the expected spec, tokens and parent exactly; None otherwise."""
    try:
        magic, length = _HEADER_LEN.unpack_from(raw)
        if magic != MAGIC:
            return None
        header = json.loads(raw[_HEADER_LEN.size : _HEADER_LEN.size + length])
        payload = raw[_HEADER_LEN.size + length :]
    except (struct.error, ValueError, UnicodeDecodeError):
        return None
    expected_bytes = int(np.prod(spec.shape)) * torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    if (header.get("v") != LAYOUT_VERSION or header.get("dtype") != spec.dtype
            or tuple(header.get("shape", ())) != spec.shape or header.get("tokens") != list(map(int, token_ids))
            or header.get("parent") != parent.hex() or len(payload) != expected_bytes
            or header.get("crc32") != zlib.crc32(payload)):
        return None
    return payload


class RedisKVTier:
    """Blocking lookups (one MGET) for the engine thread; writes on a background thread."""

    def __init__(
        self,
        url: str,
        model_id: str,
        revision: str,
        spec: BlockSpec,
        scope: str = "shared",
        ttl: float = 3600.0,
        timeout: float = 0.2,
        max_pending_writes: int = 256,
    ) -> None:
        self.spec = spec
        self.prefix = f"moemesh:kv:v{LAYOUT_VERSION}:{model_id}:{revision}:{scope}:"
        self.ttl = ttl
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.stats = TierStats()
        self.guard = RedisGuard("KV tier", stats=self.stats, bypasses="bypassed", log_level=logging.WARNING)
        self.breaker = self.guard.breaker
        self._writes: queue.Queue[list[PendingBlock] | None] = queue.Queue(max_pending_writes)
        self._writer = threading.Thread(target=self._write_forever, name="kv-tier-writer", daemon=True)
        self._writer.start()

    def key(self, block_hash: bytes) -> str:
        """The Redis key of one block."""
        return self.prefix + block_hash.hex()

    # ---- reads (engine thread) ----------------------------------------------
    def fetch(self, hashes: Sequence[bytes], parents: Sequence[bytes], tokens: Sequence[Sequence[int]]) -> list[bytes]:
        """Payloads of the leading blocks found valid (stops at the first miss or bad entry); one round trip."""
        if not hashes:
            return []
        start = time.perf_counter()
        raws = self.guard.call(self._lookup, hashes, what="lookup")
        if raws is REDIS_UNAVAILABLE:
            return []
        self.stats.lookup_seconds.append(time.perf_counter() - start)
        payloads = []
        for raw, parent, token_ids in zip(raws, parents, tokens):
            if raw is None:
                self.stats.misses += 1
                break
            self.stats.bytes_read += len(raw)
            payload = decode_entry(raw, self.spec, token_ids, parent)
            if payload is None:
                self.stats.rejected += 1
                log.warning("ignoring a corrupt or mismatched KV block entry")
                break
            payloads.append(payload)
        self.stats.hits += len(payloads)
        return payloads

    def _lookup(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        """One MGET of the blocks' entries (counted as looked up only when it is actually sent)."""
        self.stats.lookups += len(hashes)
        return self.client.mget([self.key(h) for h in hashes])

    # ---- writes (any thread; done in the background) -------------------------------
    def store(self, blocks: list[PendingBlock]) -> None:
        """Queue (hash, parent, token ids, payload) blocks for writing; dropped (and counted) when the queue is full."""
        if not blocks:
            return
        try:
            self._writes.put_nowait([(h, p, t, payload) for h, p, t, payload in blocks])
        except queue.Full:
            self.stats.dropped += len(blocks)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until queued writes are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Finish queued writes, stop the writer and close the connection pool."""
        self._writes.put(None)
        self._writer.join(timeout=5)
        self.client.close()

    def _write_forever(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            # Lowest CPU priority: on a busy host the writes wait for idle moments, not the engine.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while (batch := self._writes.get()) is not None:
            try:
                # Encoding happens inside the guarded call: nothing is encoded while the circuit is open.
                self.guard.call(self._write, batch, weight=len(batch), what="store")
            finally:
                self._writes.task_done()
        self._writes.task_done()

    def _write(self, batch: list[PendingBlock]) -> None:
        """Write one batch of blocks in one pipelined round trip (SET NX: an existing entry is kept)."""
        pipe = self.client.pipeline(transaction=False)
        size = 0
        for block_hash, parent, token_ids, payload in batch:
            entry = encode_entry(self.spec, token_ids, parent, payload)
            size += len(entry)
            pipe.set(self.key(block_hash), entry, ex=int(self.ttl), nx=True)
        pipe.execute()
        self.stats.stored += len(batch)
        self.stats.bytes_written += size
