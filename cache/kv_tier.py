"""The shared prefix-KV tier: full KV-cache blocks in Redis, keyed by chained block hash.

A worker whose local prefix cache misses asks Redis, in one MGET round trip,
for the blocks of the prompt's longest prefix; a worker that computed new
full blocks hands their keys and values to a background writer, so the
engine step never waits on Redis. Entries survive worker restarts and are
shared by every worker serving the same model revision.

Each entry carries a header (format version, dtype, shape, the block's token
ids and parent hash), its payload, and an HMAC-SHA256 of its Redis key and
all those bytes under the mesh's secret (`kv_tier_secret`): whoever can
write to Redis but does not hold the secret cannot plant blocks for a chosen
prefix (a CRC would not stop that). The MAC is checked before anything else
is read; an entry that fails it, or does not match what the reader expects
in every respect, or is malformed in any way, is a counted miss, never used
and never an exception. Without a configured secret a worker signs with a
random one of its own, so its entries serve only itself (see `RedisKVTier`).

Block hashes are salted by the request's cache scope (the tenant's, see
`worker/engine/block_manager.py`), so one tenant's blocks are never found
under another's prompt. Redis is never needed for correctness: every call runs under the
cache's `RedisGuard` (a short timeout, and a circuit breaker that skips the
tier for a while after repeated failures); requests are then served by
computing, as without the tier.

Size: entries expire after `ttl` seconds, and the Redis server's own
`maxmemory` policy (allkeys-lru on the embedded one) bounds the total.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
import torch

from moemesh.cache.guard import REDIS_UNAVAILABLE, CircuitBreaker, RedisGuard
from moemesh.cache.keys import key_segment
from moemesh.cache.stats import RECENT_LOOKUPS, recent_latencies

__all__ = ["RECENT_LOOKUPS", "BlockSpec", "CircuitBreaker", "RedisKVTier", "TierStats", "decode_entry",
           "encode_entry", "entry_mac", "parse_entry", "verify_entry"]

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2  # bump when the payload layout changes: old entries then never match (2: a MAC, no CRC32)
MAGIC = b"MMKV"
_HEADER_LEN = struct.Struct("<4sI")  # magic, header length
MAC_BYTES = hashlib.sha256().digest_size  # the HMAC-SHA256 trailer of every entry
# The secret of tiers given none: random per process, so such entries serve only the process that wrote them.
PROCESS_SECRET = secrets.token_bytes(32)
MAX_REPLACE_KEYS = 4096  # rejected entries remembered for replacement (bounded: planted keys cost no memory)

PendingBlock = tuple[bytes, bytes, Sequence[int], bytes]  # (hash, parent hash, token ids, payload) waiting to be written


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one model looks like; a stored entry must match it exactly."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]  # (layers, 2, block_size, n_kv, head_dim)

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of one block's payload."""
        return int(np.prod(self.shape)) * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass
class TierStats:
    """Counters for metrics."""

    lookups: int = 0  # blocks asked for
    hits: int = 0  # blocks found and valid
    misses: int = 0  # blocks absent
    rejected: int = 0  # blocks present but unauthenticated, corrupt or mismatched (ignored: misses)
    unverified: int = 0  # of those, entries whose MAC failed (planted, or written under another secret)
    errors: int = 0  # failed Redis calls
    bypassed: int = 0  # calls skipped while the circuit was open
    stored: int = 0  # blocks written
    dropped: int = 0  # blocks not written (writer queue full)
    bytes_read: int = 0
    bytes_written: int = 0
    lookup_seconds: deque[float] = field(default_factory=recent_latencies)  # recent latencies


def entry_mac(secret: bytes, key: str, body: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of an entry's Redis key and bytes (binding the key: a valid entry moved elsewhere fails)."""
    mac = hmac.new(secret, key.encode("utf-8", "surrogatepass") + b"\0", hashlib.sha256)
    mac.update(body)
    return mac.digest()


def encode_entry(spec: BlockSpec, token_ids: Sequence[int], parent: bytes, payload: bytes, *, secret: bytes,
                 key: str) -> bytes:
    """Header + payload + MAC bytes of the block stored under `key`."""
    header = json.dumps({
        "v": LAYOUT_VERSION, "dtype": spec.dtype, "shape": list(spec.shape), "tokens": list(map(int, token_ids)),
        "parent": parent.hex(),
    }, separators=(",", ":")).encode()
    body = _HEADER_LEN.pack(MAGIC, len(header)) + header + payload
    return body + entry_mac(secret, key, body)


def verify_entry(raw: object, *, secret: bytes, key: str) -> memoryview | None:
    """The entry's bytes before its MAC when the MAC is valid for `key` under `secret`; None otherwise."""
    if not isinstance(raw, bytes) or len(raw) < _HEADER_LEN.size + MAC_BYTES:
        return None
    view = memoryview(raw)
    body, mac = view[:-MAC_BYTES], view[-MAC_BYTES:]
    return body if hmac.compare_digest(mac, entry_mac(secret, key, body)) else None


def parse_entry(body: memoryview, spec: BlockSpec, token_ids: Sequence[int], parent: bytes) -> bytes | None:
    """The payload of verified entry bytes whose header is exactly the expected one (spec, tokens, parent) and
    whose payload has the spec's size; None for anything else, however malformed (never raises)."""
    magic, length = _HEADER_LEN.unpack_from(body)
    start = _HEADER_LEN.size
    if magic != MAGIC or length > len(body) - start:
        return None
    try:
        header = json.loads(bytes(body[start : start + length]))
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError), or absurdly nested
        return None
    expected = {"v": LAYOUT_VERSION, "dtype": spec.dtype, "shape": list(spec.shape),
                "tokens": list(map(int, token_ids)), "parent": parent.hex()}
    payload = body[start + length :]
    if header != expected or len(payload) != spec.nbytes:  # any other type or extra field is simply unequal
        return None
    return bytes(payload)


def decode_entry(raw: object, spec: BlockSpec, token_ids: Sequence[int], parent: bytes, *, secret: bytes,
                 key: str) -> bytes | None:
    """The payload of an authentic entry for `key` that matches the expected spec, tokens and parent; else None."""
    body = verify_entry(raw, secret=secret, key=key)
    return parse_entry(body, spec, token_ids, parent) if body is not None else None


class RedisKVTier:
    """Blocking lookups (one MGET) for the engine thread; writes on a background thread.

    `secret` signs and verifies every entry; workers that should share blocks need the same one (`moemesh up`
    gives its workers one per run). None: `PROCESS_SECRET`, random per process, with a warning, so that nothing
    unauthenticated is ever used; the tier then only serves this worker's own blocks (e.g. after its local
    prefix cache recycled them). `scope` namespaces the keys (an operator's partition of one Redis).
    """

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
        secret: bytes | str | None = None,
    ) -> None:
        self.spec = spec
        self.secret = self._secret(secret)
        # Each part percent-encoded: ids holding ':' cannot make two models' (or scopes') keys meet. The secret's
        # id (a MAC, revealing nothing of it) keeps entries of another secret (an earlier run's) out of the way.
        key_id = hmac.new(self.secret, b"moemesh-kv-key-id", hashlib.sha256).hexdigest()[:16]
        self.prefix = (f"moemesh:kv:v{LAYOUT_VERSION}:{key_segment(model_id)}:{key_segment(revision)}:"
                       f"{key_segment(scope)}:{key_id}:")
        # Keys whose entry was rejected: the next write of that block replaces it (SET NX would keep it forever).
        self._replace: set[str] = set()
        self.ttl = ttl
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.stats = TierStats()
        self.guard = RedisGuard("KV tier", stats=self.stats, bypasses="bypassed", log_level=logging.WARNING)
        self.breaker = self.guard.breaker
        self._writes: queue.Queue[list[PendingBlock] | None] = queue.Queue(max_pending_writes)
        self._writer = threading.Thread(target=self._write_forever, name="kv-tier-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def _secret(secret: bytes | str | None) -> bytes:
        if secret:
            return secret.encode() if isinstance(secret, str) else bytes(secret)
        log.warning("KV tier: no kv_tier_secret configured; entries are signed with a random key of this process, "
                    "so no other worker (nor this one after a restart) can use them. Set "
                    "MOEMESH_WORKER_KV_TIER_SECRET, the same on every worker, to share blocks.")
        return PROCESS_SECRET

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
        for i, (block_hash, raw, parent, token_ids) in enumerate(zip(hashes, raws, parents, tokens)):
            if raw is None:
                self.stats.misses += 1
                break
            payload = self._checked(block_hash, raw, parent, token_ids)
            if payload is None:
                # The entries after a bad one were planted with it, or are unreachable: replace them all.
                self._mark_for_replacement(h for h, r in zip(hashes[i:], raws[i:]) if r is not None)
                break
            payloads.append(payload)
        self.stats.hits += len(payloads)
        return payloads

    def _checked(self, block_hash: bytes, raw: bytes, parent: bytes, token_ids: Sequence[int]) -> bytes | None:
        """The payload of an authentic, matching entry; None (counted as rejected) for anything else."""
        self.stats.bytes_read += len(raw) if isinstance(raw, bytes) else 0
        body = verify_entry(raw, secret=self.secret, key=self.key(block_hash))
        payload = parse_entry(body, self.spec, token_ids, parent) if body is not None else None
        if payload is None:
            self.stats.rejected += 1
            self.stats.unverified += body is None
            log.warning("ignoring a KV block entry that %s", "fails its MAC (planted or corrupt)" if body is None
                        else "does not match the block asked for")
        return payload

    def _mark_for_replacement(self, hashes) -> None:
        """The next writes of these blocks overwrite their entries (bounded: planted keys cannot cost memory)."""
        for block_hash in hashes:
            if len(self._replace) >= MAX_REPLACE_KEYS:
                return
            self._replace.add(self.key(block_hash))

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

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued writes are done (tests, shutdown); whether they were within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._writes.unfinished_tasks

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
        """Write one batch of blocks in one pipelined round trip (SET NX: an existing entry is kept, unless a
        lookup rejected it)."""
        pipe = self.client.pipeline(transaction=False)
        size = 0
        for block_hash, parent, token_ids, payload in batch:
            key = self.key(block_hash)
            entry = encode_entry(self.spec, token_ids, parent, payload, secret=self.secret, key=key)
            size += len(entry)
            replace = key in self._replace
            self._replace.discard(key)
            pipe.set(key, entry, ex=int(self.ttl), nx=not replace)
        pipe.execute()
        self.stats.stored += len(batch)
        self.stats.bytes_written += size
