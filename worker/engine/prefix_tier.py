"""The engine's side of the shared prefix-KV tier: what it asks the tier for, and which blocks it writes there.

The tier itself (`moemesh.cache.kv_tier.RedisKVTier`) is reached only
through the `KVTier` protocol, so the engine never imports `moemesh.cache`.
`TierExchange` plugs into the scheduler's admission as its external prefix
cache: local prefix misses are looked up in the tier, and blocks worth
sharing are copied out of the paged cache after the step that filled them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Protocol

from moemesh.worker.engine.block_manager import block_hash

if TYPE_CHECKING:
    from moemesh.worker.engine.block_manager import BlockManager
    from moemesh.worker.engine.kv_cache import PagedKVCache
    from moemesh.worker.engine.sequence import EngineCounters, Sequence

WRITE_POLICIES = ("reused", "all")

# A block as the tier stores it: (hash, parent hash, token ids, payload bytes).
TierBlock = tuple[bytes, bytes, list[int], bytes]


class KVTier(Protocol):
    """What the engine needs of a shared KV tier; `RedisKVTier` is one."""

    def fetch(self, hashes: Seq[bytes], parents: Seq[bytes], tokens: Seq[Seq[int]]) -> list[bytes]:
        """Payloads of the leading blocks found valid, in order (it stops at the first miss)."""

    def store(self, blocks: list[TierBlock]) -> None:
        """Queue blocks for writing, without waiting for them."""


class TierExchange:
    """Moves prefix blocks between the paged cache and a shared tier: fetched on admission, exported after steps.

    Which prompt blocks are written is the `writes` policy: "reused" ones (a
    local prefix hit showed they recur; one-off prompts cost no writes) or
    "all" (every prompt block, once computed). Recently written hashes are
    remembered so that a hot prefix is not written again at every hit.
    """

    def __init__(self, cache: PagedKVCache, blocks: BlockManager, counters: EngineCounters,
                 tier: KVTier | None = None, writes: str = "reused") -> None:
        if writes not in WRITE_POLICIES:
            raise ValueError(f"kv_tier_writes must be 'reused' or 'all', got {writes!r}")
        self.cache = cache
        self.blocks = blocks
        self.counters = counters
        self.tier = tier  # None: no tier, every hook does nothing
        self.writes = writes
        self._export: list[tuple[int, bytes, bytes, list[int]]] = []  # blocks to write: (block, hash, parent, tokens)
        self._exported: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # recently written hashes

    # ---- admission (the scheduler's ExternalPrefixCache) ------------------------------------
    def match(self, seq: Sequence, hashes: list[bytes], first: int, max_blocks: int) -> list[TierBlock]:
        """Blocks `first`.. of the prompt found in the tier, in order, chained after the local hits' `hashes`.

        The chain starts at the sequence's scope-salted root, so one scope's blocks are never another's keys.
        """
        if self.tier is None or first >= max_blocks:
            return []
        bs, token_ids = self.blocks.block_size, seq.token_ids
        wanted, parent = [], hashes[-1] if hashes else seq.prefix_root
        for i in range(first, max_blocks):
            tokens = token_ids[i * bs : (i + 1) * bs]
            digest = block_hash(parent, tokens)
            wanted.append((digest, parent, tokens))
            parent = digest
        payloads = self.tier.fetch([w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted])
        return [(*w, payload) for w, payload in zip(wanted, payloads)]

    def load(self, blocks: list[int], matched: list[TierBlock]) -> list[bytes]:
        """Write fetched blocks into the cache and register them locally; returns their hashes."""
        self.cache.write_blocks(blocks, [payload for *_, payload in matched])
        hashes = []
        for block, (digest, parent, tokens, _) in zip(blocks, matched):
            self.blocks.register(block, parent, tokens)
            hashes.append(digest)
            self._exported[digest] = None  # it is in the tier already
        self.counters.tier_hit_tokens += len(matched) * self.blocks.block_size
        return hashes

    def reused(self, blocks: list[int], hashes: list[bytes], seq: Sequence) -> None:
        """Under the "reused" policy, queue the write of `seq`'s local prefix-hit blocks not written lately."""
        if self.tier is None or self.writes != "reused":
            return
        bs, token_ids = self.blocks.block_size, seq.token_ids
        for i, (block, digest) in enumerate(zip(blocks, hashes)):
            if digest in self._exported:
                self._exported.move_to_end(digest)
                continue
            parent = hashes[i - 1] if i else seq.prefix_root
            self._export.append((block, digest, parent, token_ids[i * bs : (i + 1) * bs]))

    def block_filled(self, seq: Sequence, index: int, parent: bytes, tokens: list[int]) -> None:
        """Under the "all" policy, queue the write of a sequence's block that just became full, if it is prompt."""
        # Prompt blocks only: those are what other requests share (system prompts, documents);
        # generated text rarely repeats, and writing it would cost every request.
        if self.tier is not None and self.writes == "all" and (index + 1) * self.blocks.block_size <= seq.num_prompt:
            self._export.append((seq.block_table[index], seq.block_hashes[index], parent, tokens))

    # ---- after the step -----------------------------------------------------------------------
    def flush(self) -> None:
        """Copy the queued blocks out of the cache and hand them to the tier's background writer."""
        if not self._export:
            return
        export, self._export = self._export, []
        for _, digest, _, _ in export:
            self._exported[digest] = None
        while len(self._exported) > 4 * self.blocks.num_blocks:
            self._exported.popitem(last=False)
        payloads = self.cache.read_blocks([block for block, *_ in export])
        self.tier.store([(digest, parent, tokens, payload)
                         for (_, digest, parent, tokens), payload in zip(export, payloads)])
