"""Rank 0's routing of a layer's choices to the ranks holding the experts, against a plain reference; and the
coding of the host arrays it sends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moemesh.services.core import tensors
from moemesh.worker.ops import native, remote
from moemesh.worker.ops.remote import route_to_rank, split_by_rank


def reference(owners, topk_ids, topk_weights, rank):
    """Each token with a choice on `rank`: its choices there in router order, padded with -1 / 0 to the widest."""
    rows, choices = [], []
    for t in range(owners.shape[0]):
        mine = [j for j in range(owners.shape[1]) if owners[t, j] == rank]
        if mine:
            rows.append(t)
            choices.append(mine)
    if not rows:
        return None
    width = max(map(len, choices))
    ids = np.full((len(rows), width), -1, dtype=np.int32)
    weights = np.zeros((len(rows), width), dtype=np.float32)
    for i, (t, mine) in enumerate(zip(rows, choices)):
        ids[i, : len(mine)] = topk_ids[t, mine]
        weights[i, : len(mine)] = topk_weights[t, mine]
    return np.array(rows), ids, weights, np.array(list(map(len, choices)))


@pytest.mark.parametrize("tokens", [1, 3, 4, 16, 33, 300])
@pytest.mark.parametrize("num_experts, k, world_size", [(8, 2, 2), (8, 2, 4), (64, 8, 3), (60, 4, 2)])
def test_routing_matches_the_reference_for_every_rank(tokens, num_experts, k, world_size):
    rng = np.random.default_rng(tokens * 1000 + num_experts + k + world_size)
    owners_of = rng.integers(0, world_size, num_experts)  # an uneven placement
    topk_ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(tokens)])
    topk_weights = rng.random((tokens, k), dtype=np.float32)
    owners = owners_of[topk_ids]
    owners[rng.random(owners.shape) < 0.1] = -1  # choices filtered out (computed nowhere)
    seen = 0
    for rank in range(world_size):
        got, want = route_to_rank(owners, topk_ids, topk_weights, rank), reference(owners, topk_ids, topk_weights, rank)
        if want is None:
            assert got is None
            continue
        rows, ids, weights, counts = want
        np.testing.assert_array_equal(got.rows, rows)
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_array_equal(got.weights, weights)
        assert got.choices == int(counts.sum())
        assert got.ids.dtype == np.int32 and got.weights.dtype == np.float32 and got.rows.dtype == np.int64
        seen += int(counts.sum())
    assert seen == int((owners >= 0).sum()), "every choice computed somewhere goes to exactly one rank"


def test_small_and_large_batches_take_the_two_paths_and_agree(monkeypatch):
    rng = np.random.default_rng(7)
    topk_ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(12)])
    topk_weights = rng.random((12, 2), dtype=np.float32)
    owners = np.array([0, 1, 1, 0, 2, 2, 1, 0])[topk_ids]
    small = [route_to_rank(owners, topk_ids, topk_weights, rank) for rank in range(3)]
    monkeypatch.setattr(remote, "_PYTHON_ROUTING_CHOICES", 0)
    large = [route_to_rank(owners, topk_ids, topk_weights, rank) for rank in range(3)]
    for a, b in zip(small, large):
        for field in ("rows", "ids", "weights", "choices"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_a_rank_without_choices_gets_nothing_and_a_rank_with_all_gets_them_in_order():
    topk_ids = np.array([[5, 1], [0, 7]] * 20)
    topk_weights = np.array([[0.75, 0.25], [0.5, 0.5]] * 20, dtype=np.float32)
    owners = np.ones_like(topk_ids)
    assert route_to_rank(owners, topk_ids, topk_weights, 0) is None
    routed = route_to_rank(owners, topk_ids, topk_weights, 1)
    np.testing.assert_array_equal(routed.rows, np.arange(40))
    np.testing.assert_array_equal(routed.ids, topk_ids)
    np.testing.assert_array_equal(routed.weights, topk_weights)


needs_native = pytest.mark.skipif(not native.load_kernels().available, reason="no C compiler for the native kernels")


@needs_native
@pytest.mark.parametrize("tokens", [1, 5, 32, 300])
@pytest.mark.parametrize("num_experts, k, world_size", [(8, 2, 2), (8, 2, 4), (64, 8, 3), (60, 4, 2)])
def test_the_native_split_matches_numpy_for_every_rank(monkeypatch, tokens, num_experts, k, world_size):
    rng = np.random.default_rng(tokens + 7 * num_experts + k)
    owner_of = rng.integers(-1, world_size, num_experts)  # uneven, and some experts computed nowhere
    topk_ids = torch.from_numpy(np.stack([rng.choice(num_experts, k, replace=False) for _ in range(tokens)]))
    topk_weights = torch.from_numpy(rng.random((tokens, k), dtype=np.float32))
    for wanted in (None, rng.random(num_experts) < 0.7):
        mask = None if wanted is None else torch.from_numpy(wanted.astype(np.uint8))
        fast = split_by_rank(torch.from_numpy(owner_of), topk_ids, topk_weights, mask, world_size)
        with monkeypatch.context() as patch:
            patch.setattr(native, "load_kernels", lambda: native.Kernels(None, "off for the test"))
            slow = split_by_rank(torch.from_numpy(owner_of), topk_ids, topk_weights, mask, world_size)
        assert len(fast) == len(slow) == world_size
        for a, b in zip(fast, slow):
            assert (a is None) == (b is None)
            if a is not None:
                for field in ("rows", "ids", "weights", "choices"):
                    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
                assert a.ids.dtype == np.int32 and a.weights.dtype == np.float32 and a.rows.dtype == np.int64
        computed = (owner_of[topk_ids.numpy()] >= 0) & (True if wanted is None else wanted[topk_ids.numpy()])
        assert sum(r.choices for r in fast if r is not None) == int(computed.sum())


@needs_native
def test_the_native_split_refuses_an_expert_id_out_of_range():
    owner_of = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="topk_ids"):
        split_by_rank(owner_of, torch.tensor([[0, 4]]), torch.ones(1, 2), None, 2)
    with pytest.raises(ValueError, match="topk_ids"):
        split_by_rank(owner_of, torch.tensor([[-1, 2]]), torch.ones(1, 2), None, 2)
    with pytest.raises(ValueError, match="uint8 mask"):
        native.split_routing(torch.tensor([[0, 1]]), torch.ones(1, 2), owner_of, torch.ones(5, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="topk_ids"):
        native.split_routing(torch.tensor([[0, 1]]), torch.ones(1, 2), torch.tensor([0, 2, 1, 0]), None, 2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_a_host_array_is_coded_as_the_same_tensor_message(dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    message = tensors.to_pb(array)
    assert message == tensors.to_pb(torch.from_numpy(array))
    np.testing.assert_array_equal(tensors.from_pb(message).numpy(), array)


def test_an_array_of_a_dtype_the_wire_lacks_is_refused():
    with pytest.raises(ValueError, match="cannot be encoded"):
        tensors.to_pb(np.zeros(3, dtype=np.uint8))


@needs_native
def test_a_split_of_more_tokens_after_a_smaller_one_is_still_right():
    """The native split reuses its buffers: a larger layer after a small one grows them, and the shares of each
    call are whole when read before the next."""
    rng = np.random.default_rng(3)
    owner_of = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for tokens in (1, 2, 500, 3, 64):
        topk_ids = torch.from_numpy(np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)]))
        topk_weights = torch.from_numpy(rng.random((tokens, 2), dtype=np.float32))
        owners = owner_of.numpy()[topk_ids.numpy()]
        for rank, share in enumerate(split_by_rank(owner_of, topk_ids, topk_weights, None, 4)):
            want = reference(owners, topk_ids.numpy(), topk_weights.numpy(), rank)
            if want is None:
                assert share is None
                continue
            np.testing.assert_array_equal(share.rows, want[0])
            np.testing.assert_array_equal(share.ids, want[1])
            np.testing.assert_array_equal(share.weights, want[2])


def held_choices_both(monkeypatch, rows_of, ids):
    """`held_choices` natively (int32 ids) and through numpy (the kernels off, and int64 ids)."""
    fast = remote.held_choices(rows_of, ids.astype(np.int32))
    with monkeypatch.context() as patch:
        patch.setattr(native, "load_kernels", lambda: native.Kernels(None, "off for the test"))
        slow = remote.held_choices(rows_of, ids.astype(np.int32))
    wide = remote.held_choices(rows_of, ids.astype(np.int64))
    return fast, slow, wide


@needs_native
@pytest.mark.parametrize("tokens, k", [(1, 1), (1, 2), (7, 2), (32, 8), (300, 4)])
def test_a_shards_choices_map_to_its_rows_natively_as_through_numpy(monkeypatch, tokens, k):
    rng = np.random.default_rng(tokens * 10 + k)
    held = np.sort(rng.choice(64, 24, replace=False))
    rows_of = remote.held_rows(64, held.tolist())
    ids = np.stack([rng.choice(held, k, replace=False) for _ in range(tokens)])
    valid = np.arange(k)[None, :] < rng.integers(1, k + 1, tokens)[:, None]  # 1 to k valid choices, then -1
    ids = np.where(valid, ids, -1)
    fast, slow, wide = held_choices_both(monkeypatch, rows_of, ids)
    want = np.where(valid, rows_of[np.maximum(ids, 0)], -1)
    for got in (fast, slow, wide):
        assert got is not None and got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@needs_native
@pytest.mark.parametrize("ids", [
    [[3, 9]],  # 9 is not held
    [[3, 64]],  # out of range
    [[3, -2]],  # below -1
    [[-1, 3]],  # a valid choice after a -1
    [[3, 5], [-1, -1]],  # a row without a first choice
])
def test_choices_not_for_a_shard_are_refused_natively_and_through_numpy(monkeypatch, ids):
    rows_of = remote.held_rows(64, [3, 5, 7])
    assert held_choices_both(monkeypatch, rows_of, np.array(ids)) == (None, None, None)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_a_tensor_message_decodes_to_a_read_only_host_array(dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    decoded = tensors.array_from_pb(tensors.to_pb(array))
    assert decoded.dtype == array.dtype and not decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array)
    wide = tensors.array_from_pb(tensors.to_pb(torch.tensor([[0.5, -2.0]], dtype=torch.bfloat16)))
    assert wide.dtype == np.float32 and wide.tolist() == [[0.5, -2.0]]
    short = tensors.to_pb(array)
    short.data = short.data[:-1]
    with pytest.raises(ValueError, match="bytes"):
        tensors.array_from_pb(short)
