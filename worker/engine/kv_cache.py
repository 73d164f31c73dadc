"""The paged key/value cache and its block manager, with automatic prefix caching.

Keys and values live in fixed-size blocks: each layer holds
`[num_blocks, block_size, n_kv, D]` tensors, and a sequence owns a list of
block ids (its block table) whose i-th entry holds its positions
`[i * block_size, (i + 1) * block_size)`. Memory is committed a block at a
time as sequences grow, so short and long sequences share one pool.

A full block is also registered under a chained hash of every token up to
its end (`block_hash`), so that a later sequence with the same prefix reuses
those blocks instead of recomputing them. A hit is verified against the
token ids and the parent hash stored with the block, so a colliding hash
cannot lend a sequence keys computed for other tokens. Blocks nobody uses
stay cached and are recycled least recently freed first.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import torch

ROOT_HASH = b"moemesh-kv-v1"  # the chain's seed; bump to invalidate hashes of an older layout


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of a full block given its parent's hash: stable across processes (usable as a shared key)."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids))
    return digest.digest()


def prefix_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (at most `limit` of them)."""
    count = len(token_ids) // block_size if limit is None else min(limit, len(token_ids) // block_size)
    hashes, parent = [], ROOT_HASH
    for i in range(count):
        parent = block_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class PagedKVCache:
    """Per-layer K and V block pools; positions are addressed as flat slots `block * block_size + offset`."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def bytes_per_block(self) -> int:
        """Memory one block takes across all layers, keys and values."""
        first = self.k[0]
        return 2 * self.num_layers * first[0].numel() * first.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values of N tokens: slots [N] flat positions, k and v [N, n_kv, D]."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of each row's blocks in order: block_tables [B, nb] -> 2 x [B, nb * block_size, n_kv, D]."""
        B, nb = block_tables.shape
        flat = block_tables.reshape(-1)
        keys = self.k[layer].index_select(0, flat)  # [B*nb, bs, n_kv, D]
        values = self.v[layer].index_select(0, flat)
        return keys.view(B, nb * self.block_size, *keys.shape[2:]), values.view(B, nb * self.block_size, *values.shape[2:])

    def copy_blocks(self, layer: int, block_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given blocks (for export): 2 x [n, bs, n_kv, D]."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.k[layer].device)
        return self.k[layer].index_select(0, index), self.v[layer].index_select(0, index)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one exported block: (layers, 2, block_size, n_kv, D)."""
        return (self.num_layers, 2, *self.k[0].shape[1:])

    def read_blocks(self, block_ids: Sequence[int]) -> list[bytes]:
        """Each block's keys and values, all layers, as raw bytes in `block_shape` order (on the CPU)."""
        if not block_ids:
            return []
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.k[0].device)
        per_layer = [torch.stack((k.index_select(0, index), v.index_select(0, index)), dim=1)
                     for k, v in zip(self.k, self.v)]  # L x [n, 2, bs, n_kv, D]
        blocks = torch.stack(per_layer, dim=1).cpu().contiguous()  # [n, L, 2, bs, n_kv, D]
        flat = blocks.view(len(block_ids), -1).view(torch.uint8)
        return [row.numpy().tobytes() for row in flat]

    def write_blocks(self, block_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Fill blocks from bytes made by `read_blocks` (same shape and dtype)."""
        if not block_ids:
            return
        first = self.k[0]
        raw = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8)
        data = raw.view(first.dtype).view(len(block_ids), *self.block_shape).to(first.device)
        index = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
        for layer in range(self.num_layers):
            self.k[layer].index_copy_(0, index, data[:, layer, 0])
            self.v[layer].index_copy_(0, index, data[:, layer, 1])


class OutOfBlocks(Exception):
    """Raised by `BlockManager.allocate` when the pool cannot supply the blocks asked for."""


class BlockManager:
    """Hands out cache blocks, counts references, and keeps full blocks findable by prefix hash.

    A block is in use (ref count > 0), or free. Free blocks sit in one queue,
    recycled from its front; a free block that still holds a registered
    prefix stays findable until the queue recycles it. A freed sequence's
    blocks join the back tail first, so the shared beginnings of prompts
    outlive their tails, and blocks holding nothing reusable go to the front.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.parent_of: list[bytes | None] = [None] * num_blocks  # hash of the blocks before it
        self.by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unused ones included)."""
        return len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a prefix hash (in use or free)."""
        return len(self.by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], max_blocks: int) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding the longest prefix of `token_ids` (at most `max_blocks`), and their hashes.

        Each candidate block's stored token ids must equal the prompt's, and it
        must have been registered after the same blocks (its stored parent hash
        equals the match so far), or the match stops there: a block's keys
        depend on every token before it. Takes no reference: call `take` on the result.
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks, hashes, parent = [], [], ROOT_HASH
        for i in range(min(max_blocks, len(token_ids) // self.block_size)):
            chunk = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            digest = block_hash(parent, chunk)
            block = self.by_hash.get(digest)
            if block is None or self.tokens_of[block] != chunk or self.parent_of[block] != parent:
                break
            blocks.append(block)
            hashes.append(digest)
            parent = digest
        return blocks, hashes

    def register(self, block: int, parent: bytes, token_ids: Sequence[int]) -> bytes:
        """Record a now-full block under its chained hash; returns the hash (the next block's parent)."""
        chunk = tuple(token_ids)
        digest = block_hash(parent, chunk)
        if self.enable_prefix_caching and digest not in self.by_hash and self.hash_of[block] is None:
            self.by_hash[digest] = block
            self.hash_of[block] = digest
            self.tokens_of[block] = chunk
            self.parent_of[block] = parent
        return digest

    # ---- references ----------------------------------------------------------
    def take(self, blocks: Sequence[int]) -> None:
        """Add a reference to each of `blocks` (e.g. prefix hits), pulling free ones out of the queue."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (recycling the oldest free ones); OutOfBlocks if there are fewer free."""
        if count > len(self.free):
            raise OutOfBlocks(f"{count} blocks wanted, {len(self.free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block; unused ones become free, the sequence's tail recycled first."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:
                    self.free.move_to_end(block, last=False)  # holds nothing reusable: recycle it first

    def reset_prefix_cache(self) -> None:
        """Forget every registered prefix (blocks in use keep their contents)."""
        for block in list(self.by_hash.values()):
            self._forget(block)

    def _forget(self, block: int) -> None:
        digest = self.hash_of[block]
        if digest is not None:
            self.by_hash.pop(digest, None)
            self.hash_of[block] = None
            self.tokens_of[block] = None
            self.parent_of[block] = None
