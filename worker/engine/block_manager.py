"""Which cache blocks a sequence owns, and prefix caching by chained block hashes (no tensors here).

A sequence owns a list of block ids (its block table) whose i-th entry holds
its positions `[i * block_size, (i + 1) * block_size)`; blocks are taken as
sequences grow, so short and long sequences share one pool (`kv_cache.py`
holds the tensors).

A full block is also registered under a chained hash of every token up to
its end (`block_hash`), so that a later sequence with the same prefix reuses
those blocks instead of recomputing them. A hit is verified against the
token ids and the parent hash stored with the block, so a colliding hash
cannot lend a sequence keys computed for other tokens. Blocks nobody uses
stay cached and are recycled least recently freed first.

Every chain starts from a root salted by the request's cache scope
(`prefix_root`): prompts of different scopes (tenants, unless an operator
shares one scope) never share a block, so a prefix hit, and the
`cached_tokens` it shows, reveals only prompts of the caller's own scope.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

ROOT_HASH = b"moemesh-kv-v1"  # the chain's seed; bump to invalidate hashes of an older layout


def prefix_root(cache_scope: str) -> bytes:
    """The first parent of every hash chain of `cache_scope`: chains of different scopes never meet."""
    digest = hashlib.blake2b(ROOT_HASH, digest_size=16, person=b"moemesh-scope")
    digest.update(cache_scope.encode("utf-8", "surrogatepass"))
    return digest.digest()


DEFAULT_ROOT = prefix_root("")  # requests that carry no scope (callers inside the mesh, tests)


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of a full block given its parent's hash: stable across processes (usable as a shared key)."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids))
    return digest.digest()


def prefix_hashes(token_ids: Sequence[int], block_size: int, limit: int | None = None,
                  root: bytes = DEFAULT_ROOT) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (at most `limit` of them), from the scope's `root`."""
    count = len(token_ids) // block_size if limit is None else min(limit, len(token_ids) // block_size)
    hashes, parent = [], root
    for i in range(count):
        parent = block_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


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
    def match_prefix(self, token_ids: Sequence[int], max_blocks: int,
                     root: bytes = DEFAULT_ROOT) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding the longest prefix of `token_ids` (at most `max_blocks`), and their hashes.

        `root` is the scope's `prefix_root`: only blocks registered by chains of that scope match.
        Each candidate block's stored token ids must equal the prompt's, and it
        must have been registered after the same blocks (its stored parent hash
        equals the match so far), or the match stops there: a block's keys
        depend on every token before it. Takes no reference: call `take` on the result.
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks, hashes, parent = [], [], root
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
