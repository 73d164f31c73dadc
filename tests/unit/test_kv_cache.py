"""BlockManager and PagedKVCache without a model: references, prefix caching, recycling order, hashes, paging."""

from __future__ import annotations

import hashlib

import pytest
import torch

from moemesh.worker.engine.block_manager import (
    DEFAULT_ROOT,
    ROOT_HASH,
    BlockManager,
    OutOfBlocks,
    block_hash,
    prefix_hashes,
    prefix_root,
)
from moemesh.worker.engine.kv_cache import PagedKVCache

BS = 4  # block size of most tests


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def fill(bm: BlockManager, token_ids: list[int], root: bytes = DEFAULT_ROOT) -> tuple[list[int], list[bytes]]:
    """Allocate blocks for `token_ids` as the engine does and register the full ones from the scope's `root`;
    (block table, hashes)."""
    table = bm.allocate(bm.blocks_for(len(token_ids)))
    hashes, parent = [], root
    for i in range(len(token_ids) // bm.block_size):
        parent = bm.register(table[i], parent, token_ids[i * bm.block_size : (i + 1) * bm.block_size])
        hashes.append(parent)
    return table, hashes


def free_order(bm: BlockManager) -> list[int]:
    return list(bm.free)


# ---- allocation and references ------------------------------------------------


def test_allocate_take_release_count_references():
    bm = BlockManager(8, BS)
    assert bm.num_free == 8 and bm.ref_count == [0] * 8
    a = bm.allocate(3)
    assert len(set(a)) == 3 and all(bm.ref_count[b] == 1 for b in a)
    assert bm.num_free == 5
    bm.take(a[:2])  # a second owner of the first two
    assert [bm.ref_count[b] for b in a] == [2, 2, 1]
    assert bm.num_free == 5, "taking blocks in use frees nothing and takes nothing from the queue"
    bm.release(a)
    assert [bm.ref_count[b] for b in a] == [1, 1, 0]
    assert bm.num_free == 6 and a[2] in bm.free and a[0] not in bm.free
    bm.release(a[:2])
    assert bm.num_free == 8 and bm.ref_count == [0] * 8


def test_allocate_more_than_free_raises_and_changes_nothing():
    bm = BlockManager(4, BS)
    held = bm.allocate(3)
    with pytest.raises(OutOfBlocks):
        bm.allocate(2)
    assert bm.num_free == 1, "a refused allocation must not take any block"
    assert bm.allocate(0) == []
    last = bm.allocate(1)
    assert bm.num_free == 0 and set(held + last) == {0, 1, 2, 3}
    with pytest.raises(OutOfBlocks):
        bm.allocate(1)


def test_blocks_for_and_bad_sizes():
    bm = BlockManager(4, BS)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


# ---- prefix matching ----------------------------------------------------------


def test_match_returns_the_shared_full_blocks_and_their_hashes():
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS + 2)  # 3 full blocks and a partial one
    table, hashes = fill(bm, prompt)
    assert len(hashes) == 3 and bm.num_cached == 3
    other = prompt[: 2 * BS] + [7] * (2 * BS)  # shares the first 2 full blocks
    blocks, found = bm.match_prefix(other, max_blocks=10)
    assert blocks == table[:2] and found == hashes[:2]
    assert [bm.ref_count[b] for b in table] == [1, 1, 1, 1], "match_prefix takes no reference"


def test_a_partial_last_block_never_matches():
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS)
    table, _ = fill(bm, prompt)
    # The query's third block is incomplete (3 of 4 tokens, equal to the registered ones).
    blocks, _ = bm.match_prefix(prompt[: 2 * BS + 3], max_blocks=10)
    assert blocks == table[:2]
    blocks, _ = bm.match_prefix(prompt[: BS - 1], max_blocks=10)
    assert blocks == []


def test_max_blocks_caps_the_match():
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS)
    table, hashes = fill(bm, prompt)
    assert bm.match_prefix(prompt, max_blocks=3) == (table, hashes)
    assert bm.match_prefix(prompt, max_blocks=2) == (table[:2], hashes[:2])
    assert bm.match_prefix(prompt, max_blocks=0) == ([], [])


def test_a_block_whose_stored_tokens_differ_stops_the_match():
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS)
    table, _ = fill(bm, prompt)
    # Simulate a hash collision: the block registered under block 1's hash holds other tokens.
    bm.tokens_of[table[1]] = (1, 2, 3, 4)
    blocks, _ = bm.match_prefix(prompt, max_blocks=10)
    assert blocks == table[:1], "a hit must be verified against the block's own token ids"


def test_a_hash_collision_under_a_different_prefix_does_not_match():
    """Block 1 of X = [A, B] and block 1 of the query [C, B] hold the same tokens B, but B's keys
    depend on the tokens before it. If the query's chained hash of B collided with X's, the match
    must still refuse X's block: its keys were computed after A, not after C."""
    bm = BlockManager(16, BS)
    a, b, c = tokens(BS, 10), tokens(BS, 20), tokens(BS, 30)
    x_table, _ = fill(bm, a + b)
    y_table, (c_hash,) = fill(bm, c)
    bm.by_hash[block_hash(c_hash, b)] = x_table[1]  # the collision
    blocks, _ = bm.match_prefix(c + b, max_blocks=10)
    assert blocks == y_table[:1], "a block computed after another prefix was lent to this one"


def test_same_block_content_after_a_different_prefix_does_not_match():
    bm = BlockManager(16, BS)
    a, b, c = tokens(BS, 10), tokens(BS, 20), tokens(BS, 30)
    x_table, _ = fill(bm, a + b)
    y_table, _ = fill(bm, c)
    blocks, _ = bm.match_prefix(c + b, max_blocks=10)
    assert blocks == y_table, "only C's block may match: B's block hashes its parent A too"
    blocks, _ = bm.match_prefix(b, max_blocks=10)
    assert blocks == [], "B at the start is another block than B after A"
    assert bm.match_prefix(a + b, max_blocks=10)[0] == x_table


def test_a_duplicate_block_is_not_registered_twice():
    bm = BlockManager(16, BS)
    prompt = tokens(2 * BS)
    first, hashes = fill(bm, prompt)
    second, again = fill(bm, prompt)  # computed again elsewhere (e.g. two equal prompts in one step)
    assert again == hashes, "register returns the chain hash even when the block is not recorded"
    assert bm.num_cached == 2 and bm.match_prefix(prompt, 10)[0] == first
    assert bm.hash_of[second[0]] is None and bm.hash_of[second[1]] is None
    bm.release(second)
    assert set(free_order(bm)[:2]) == set(second), "the copies hold nothing findable: they are recycled first"


def test_prefix_caching_off_never_matches():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    prompt = tokens(3 * BS)
    table, hashes = fill(bm, prompt)
    assert hashes == prefix_hashes(prompt, BS), "the hash chain is still returned"
    assert bm.num_cached == 0
    assert bm.match_prefix(prompt, max_blocks=10) == ([], [])
    bm.release(table)
    assert bm.match_prefix(prompt, max_blocks=10) == ([], [])


def test_reset_prefix_cache_forgets_everything_but_keeps_references():
    bm = BlockManager(16, BS)
    prompt = tokens(2 * BS)
    table, _ = fill(bm, prompt)
    bm.reset_prefix_cache()
    assert bm.num_cached == 0 and bm.match_prefix(prompt, 10) == ([], [])
    assert [bm.ref_count[b] for b in table] == [1, 1]
    assert all(bm.hash_of[b] is None and bm.tokens_of[b] is None for b in table)


# ---- free queue and recycling ---------------------------------------------------


def test_a_freed_cached_block_stays_findable_until_recycled():
    bm = BlockManager(4, BS)
    prompt = tokens(2 * BS)
    table, hashes = fill(bm, prompt)
    bm.release(table)
    assert bm.num_free == 4, "cached but unused blocks count as free"
    assert bm.match_prefix(prompt, 10) == (table, hashes)
    bm.allocate(4)  # recycles every block
    assert bm.match_prefix(prompt, 10) == ([], []) and bm.num_cached == 0


def test_allocate_recycles_the_oldest_free_block_and_forgets_its_hash():
    bm = BlockManager(6, BS)
    p1, p2 = tokens(2 * BS, 100), tokens(2 * BS, 200)
    s1, h1 = fill(bm, p1)
    s2, h2 = fill(bm, p2)
    bm.release(s1)  # freed first: recycled first
    bm.release(s2)
    never_used = bm.allocate(2)
    assert set(never_used).isdisjoint(s1 + s2), "blocks holding nothing go before cached ones"
    (recycled,) = bm.allocate(1)
    assert recycled == s1[1], "the oldest freed sequence, its tail first"
    assert bm.hash_of[recycled] is None and bm.tokens_of[recycled] is None and h1[1] not in bm.by_hash
    assert bm.match_prefix(p1, 10) == (s1[:1], h1[:1]), "the head block outlives the tail"
    assert bm.allocate(1) == [s1[0]]
    assert bm.match_prefix(p1, 10) == ([], [])
    assert bm.match_prefix(p2, 10) == (s2, h2), "the later freed sequence is still whole"


def test_a_freed_sequences_head_outlives_its_tail():
    bm = BlockManager(3, BS)
    prompt = tokens(3 * BS)
    table, _ = fill(bm, prompt)
    bm.release(table)
    assert free_order(bm) == list(reversed(table)), "tail recycled first, head last"
    assert bm.allocate(2) == [table[2], table[1]]
    assert bm.match_prefix(prompt, 10)[0] == table[:1]


def test_blocks_holding_nothing_registered_are_recycled_before_cached_ones():
    bm = BlockManager(8, BS)
    cached, _ = fill(bm, tokens(2 * BS))
    plain = bm.allocate(6)  # takes the rest; holds nothing registered
    bm.release(cached)
    bm.release(plain)  # freed later, yet recycled first
    assert set(bm.allocate(6)) == set(plain)
    assert bm.match_prefix(tokens(2 * BS), 10)[0] == cached
    # A sequence whose last block is partial: that block goes to the front, its full blocks to the back.
    bm2 = BlockManager(4, BS)
    table, _ = fill(bm2, tokens(2 * BS + 1))
    bm2.release(table)
    assert bm2.allocate(2)[0] == table[2], "the partial (unregistered) block is recycled first"


def test_take_on_a_free_cached_block_pulls_it_out_of_the_queue():
    bm = BlockManager(4, BS)
    prompt = tokens(2 * BS)
    table, hashes = fill(bm, prompt)
    bm.release(table)
    hits, _ = bm.match_prefix(prompt, 10)
    bm.take(hits[:1])
    assert bm.ref_count[table[0]] == 1 and table[0] not in bm.free and bm.num_free == 3
    others = bm.allocate(3)
    assert table[0] not in others
    with pytest.raises(OutOfBlocks):
        bm.allocate(1)
    assert bm.match_prefix(prompt, 10) == (table[:1], hashes[:1]), "the taken block keeps its prefix"
    bm.release(hits[:1])
    assert bm.num_free == 1 and bm.allocate(1) == [table[0]]


# ---- hashes ----------------------------------------------------------------------


def test_prefix_hashes_equal_the_hashes_register_produces():
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS + 3)
    _, hashes = fill(bm, prompt)
    assert prefix_hashes(prompt, BS) == hashes
    assert prefix_hashes(prompt, BS, limit=2) == hashes[:2]
    assert prefix_hashes(prompt, BS, limit=10) == hashes
    assert prefix_hashes(prompt[: BS - 1], BS) == []
    assert bm.match_prefix(prompt, 10)[1] == hashes


def test_hashes_are_stable_across_processes():
    # Literal digests: they key a shared cache tier, so they must not depend on the process
    # (no Python hash(), no pickling) and must change only with ROOT_HASH.
    assert ROOT_HASH == b"moemesh-kv-v1"
    assert block_hash(ROOT_HASH, [1, 2, 3, 4]).hex() == "93a5d3ea2d725f575bd5a66a4cfbaf77"
    # The documented layout: blake2b-128 keyed by nothing, over the parent then 4-byte little-endian ids.
    ids = [0, 1, 511, 2**32 - 1]
    expected = hashlib.blake2b(ROOT_HASH + b"".join(i.to_bytes(4, "little") for i in ids), digest_size=16).digest()
    assert block_hash(ROOT_HASH, ids) == expected
    assert block_hash(ROOT_HASH, torch.tensor(ids[:3]).tolist()) == block_hash(ROOT_HASH, tuple(ids[:3]))
    first, second = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert first == block_hash(DEFAULT_ROOT, [1, 2, 3, 4]) and second == block_hash(first, [5, 6, 7, 8])
    # A chain starts at its cache scope's root: blake2b-128 of ROOT_HASH and the scope, personalised.
    assert DEFAULT_ROOT == prefix_root("")
    assert prefix_root("tenant:acme").hex() == hashlib.blake2b(
        ROOT_HASH + b"tenant:acme", digest_size=16, person=b"moemesh-scope").hexdigest()


# ---- cache scopes ------------------------------------------------------------------


def test_a_prefix_registered_in_one_scope_is_not_found_from_another():
    bm = BlockManager(16, BS)
    prompt = tokens(3 * BS + 1)
    alpha, beta = prefix_root("tenant:alpha"), prefix_root("tenant:beta")
    table, hashes = fill(bm, prompt, alpha)
    assert bm.match_prefix(prompt, 10, beta) == ([], []), "another tenant's scope must not reuse alpha's blocks"
    assert bm.match_prefix(prompt, 10) == ([], []), "nor a request naming no scope"
    assert bm.match_prefix(prompt, 10, alpha) == (table[:3], hashes), "alpha's own repeat hits every full block"
    assert prefix_hashes(prompt, BS, root=alpha) == hashes
    assert set(prefix_hashes(prompt, BS, root=beta)).isdisjoint(hashes), "no block hash is shared across scopes"


def test_the_same_scope_shares_and_scope_roots_never_meet():
    bm = BlockManager(16, BS)
    prompt = tokens(2 * BS)
    shared = prefix_root("scope:team")
    table, _ = fill(bm, prompt, shared)
    assert bm.match_prefix(prompt, 10, prefix_root("scope:team"))[0] == table, "one configured scope shares"
    roots = {prefix_root(s) for s in ("", "shared", "tenant:a", "scope:a", "tenant:a:b", "tenant:a\0b")}
    assert len(roots) == 6 and ROOT_HASH not in roots


# ---- paged storage ------------------------------------------------------------------


def test_write_then_gather_follows_out_of_order_block_tables():
    n_layers, n_blocks, n_kv, dim = 2, 7, 2, 3
    cache = PagedKVCache(n_layers, n_blocks, BS, n_kv, dim)
    assert cache.num_layers == 2 and cache.bytes_per_block == 2 * n_layers * BS * n_kv * dim * 4
    tables = [[5, 1, 3], [0, 6, 2]]
    lengths = [10, 12]
    g = torch.Generator().manual_seed(0)
    written = []
    for table, length in zip(tables, lengths):
        k = torch.randn(length, n_kv, dim, generator=g)
        v = torch.randn(length, n_kv, dim, generator=g)
        order = torch.randperm(length, generator=g)  # slots need not be written in position order
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(length)])[order]
        cache.write(1, slots, k[order], v[order])
        written.append((k, v))
    keys, values = cache.gather(1, torch.tensor(tables))
    assert keys.shape == values.shape == (2, 3 * BS, n_kv, dim)
    for row, ((k, v), length) in enumerate(zip(written, lengths)):
        assert torch.equal(keys[row, :length], k) and torch.equal(values[row, :length], v)
    assert torch.equal(keys[0, 10:], torch.zeros(2, n_kv, dim)), "unwritten slots of block 3 stay zero"
    # Block 4 was never in a table; layer 0 was never written.
    assert not cache.k[1][4].any() and not cache.k[0].any() and not cache.v[0].any()
    # A table in another order reads the same blocks in that order.
    keys, _ = cache.gather(1, torch.tensor([[3, 5]]))
    assert torch.equal(keys[0, :BS], torch.cat([written[0][0][2 * BS :], torch.zeros(2, n_kv, dim)]))
    assert torch.equal(keys[0, BS:], written[0][0][:BS])
    k_blocks, v_blocks = cache.copy_blocks(1, [1, 6])
    assert torch.equal(k_blocks[0], written[0][0][BS : 2 * BS]) and torch.equal(v_blocks[1], written[1][1][BS : 2 * BS])
