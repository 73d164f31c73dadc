"""The native CPU kernels (built here with the system C compiler) against plain PyTorch references."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Target
from moemesh.worker.ops.experts import NativeExperts, TorchExperts
from moemesh.worker.ops.remote import held_rows, run_held
from tests.support.references import reference_experts


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("no C compiler on this machine: the native kernels cannot exist here")
    loaded = native.load_kernels()
    assert loaded.available, f"the native kernels failed to build: {loaded.reason}"
    return loaded


def paged_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def reference_decode(q, k, v, tables, lens, window):
    """Gather each sequence's blocks and run SDPA with a mask: the portable path."""
    B, nb = tables.shape
    block_size = k.shape[1]
    keys = k[tables].view(B, nb * block_size, *k.shape[2:]).transpose(1, 2)
    values = v[tables].view(B, nb * block_size, *v.shape[2:]).transpose(1, 2)
    pos = torch.arange(nb * block_size)
    mask = pos[None] < lens[:, None]
    if window:
        mask &= pos[None] >= lens[:, None] - window
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None], enable_gqa=True)
    return out[:, :, 0]


@pytest.mark.parametrize(
    "num_seqs,num_heads,num_kv_heads,head_dim,window",
    [(32, 8, 4, 64, None), (5, 4, 4, 32, None), (1, 8, 2, 48, None), (7, 6, 1, 16, 9), (3, 4, 2, 128, 40),
     (4, 4, 2, 40, None), (3, 2, 1, 256, 7)],  # 40, 256: outside the 16-wide vector path
)
def test_paged_decode_attention_matches_gather_and_sdpa(num_seqs, num_heads, num_kv_heads, head_dim, window):
    block_size, per_seq = 4, 12
    k, v = paged_cache(num_seqs * per_seq + 3, block_size, num_kv_heads, head_dim)
    g = torch.Generator().manual_seed(1)
    # Scattered, shuffled blocks, as a long-running block manager hands them out.
    tables = torch.randperm(num_seqs * per_seq + 3, generator=g)[: num_seqs * per_seq].view(num_seqs, per_seq)
    lens = torch.randint(1, per_seq * block_size + 1, (num_seqs,), generator=g)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g)
    got = native.paged_decode_attention(q, k, v, tables, lens, window)
    torch.testing.assert_close(got, reference_decode(q, k, v, tables, lens, window), rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_rejects_out_of_range_tables_and_lengths():
    k, v = paged_cache(8, 4, 2, 16)
    q = torch.randn(2, 4, 16)
    tables = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="out of range"):
        native.paged_decode_attention(q, k, v, tables, torch.tensor([3, 9]), None)  # 9 keys need 3 blocks
    with pytest.raises(ValueError, match="out of range"):
        native.paged_decode_attention(q, k, v, torch.tensor([[0, 1], [2, 8]]), torch.tensor([3, 8]), None)
    with pytest.raises(ValueError, match="shapes"):
        native.paged_decode_attention(torch.randn(2, 3, 16), k, v, tables, torch.tensor([3, 8]), None)
    with pytest.raises(ValueError, match="float32"):  # the kernel would read past a 16-bit cache
        native.paged_decode_attention(q, k.bfloat16(), v.bfloat16(), tables, torch.tensor([3, 8]), None)
    # The kernel still serves a valid call afterwards.
    lens = torch.tensor([3, 8])
    torch.testing.assert_close(native.paged_decode_attention(q, k, v, tables, lens, None),
                               reference_decode(q, k, v, tables, lens, None), rtol=1e-5, atol=1e-5)


def routed(num_tokens: int, num_experts: int, top_k: int, seed: int, skew: bool = False):
    """A random top-k routing: ids [T, k] (distinct per token) and weights [T, k]; `skew` favours expert 0."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if skew:
        scores[:, 0] += 1.0
    ids = scores.topk(top_k, dim=-1).indices
    return ids, torch.rand(num_tokens, top_k, generator=g)


def expert_layer(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, seed: int):
    """Random inputs, expert weights (checkpoint layout) and routing for one MoE layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    ids, weights = routed(num_tokens, num_experts, top_k, seed=seed + 1, skew=num_tokens > 500)
    return x, w13, w2, ids, weights


@pytest.mark.parametrize(
    "num_tokens,hidden,inter,num_experts,top_k",
    # A dimension that is not a multiple of 16 takes the plain loop for the product that runs along it;
    # an odd intermediate size and a hidden size that is not a multiple of 4 leave partial tiles;
    # 700 tokens give one expert more rows than one pass over its weights takes.
    [(32, 64, 96, 8, 2), (3, 48, 40, 4, 2), (40, 33, 17, 4, 3), (1, 64, 64, 8, 2), (20, 32, 23, 4, 2),
     (20, 18, 32, 4, 2), (100, 64, 32, 4, 2), (700, 32, 32, 4, 2)],
)
def test_moe_experts_match_the_per_expert_pytorch_loop(num_tokens, hidden, inter, num_experts, top_k):
    x, w13, w2, ids, weights = expert_layer(num_tokens, hidden, inter, num_experts, top_k, seed=2)
    for expert_ids in (None, [e for e in range(num_experts) if e % 2 == 1], []):
        got = native.moe_experts(x, ids, weights, w13, w2, expert_ids)
        expected = reference_experts(x, ids, weights, w13, w2, expert_ids)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_moe_experts_reject_bad_routing_and_shapes():
    x, w13, w2 = torch.randn(4, 16), torch.randn(2, 32, 16), torch.randn(2, 16, 16)
    ids, weights = torch.tensor([[0], [1], [1], [0]]), torch.ones(4, 1)
    with pytest.raises(ValueError, match="topk_ids"):
        native.moe_experts(x, torch.tensor([[0], [2], [1], [0]]), weights, w13, w2)
    with pytest.raises(ValueError, match="topk_ids"):
        native.moe_experts(x, torch.tensor([[0], [-2], [1], [0]]), weights, w13, w2)
    with pytest.raises(ValueError, match="shapes"):
        native.moe_experts(x, ids, weights, w13, torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="shapes"):
        native.moe_experts(x, ids[:3], weights[:3], w13, w2)
    # The kernel still serves a valid call afterwards.
    torch.testing.assert_close(native.moe_experts(x, ids, weights, w13, w2),
                               reference_experts(x, ids, weights, w13, w2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("panels", [False, True])
def test_moe_experts_skip_untaken_choices(panels):
    # Expert parallelism hands a rank rows with fewer choices than k, the rest -1: one call takes them all, as
    # if the untaken choices weighed nothing; a row with no choice at all comes out zero.
    x, w13, w2, ids, weights = expert_layer(24, 64, 32, 6, 3, seed=9)
    untaken = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.4
    untaken[5] = True
    ids, weights = ids.masked_fill(untaken, -1), weights.masked_fill(untaken, 0.5)  # their weights are ignored
    layout = native.pack_experts(w13, w2) if panels else (w13, w2)
    got = native.moe_experts(x, ids, weights, *layout)
    expected = reference_experts(x, ids.clamp(min=0), weights.masked_fill(untaken, 0.0), w13, w2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not got[5].any()


def test_a_rank_computes_rows_of_mixed_choice_counts_in_one_call():
    # A rank's rows carry 1 to k of its experts' choices, -1 after: run_held maps them to rows of the held stack
    # and every backend takes them in one call, giving the weighted sums over the held experts.
    x, w13, w2, ids, weights = expert_layer(40, 64, 32, 8, 3, seed=11)
    held = [1, 2, 5, 6]  # this rank's experts; rows_of maps global ids to rows of the held stack
    rows_of = held_rows(8, held)
    mine = np.isin(ids.numpy(), held)
    keep = mine.any(axis=1)
    order = np.argsort(~mine[keep], axis=1, kind="stable")  # each row's held choices first, then the others
    local_ids = np.take_along_axis(np.where(mine[keep], ids.numpy()[keep], -1), order, axis=1)
    local_weights = np.take_along_axis(np.where(mine[keep], weights.numpy()[keep], 0.0), order, axis=1).astype(np.float32)
    assert len(set(np.count_nonzero(local_ids >= 0, axis=1).tolist())) > 1  # mixed counts
    xs = x[torch.from_numpy(np.flatnonzero(keep))]
    expected = reference_experts(xs, torch.from_numpy(np.maximum(local_ids, 0)), torch.from_numpy(local_weights), w13, w2)
    for backend in (NativeExperts.build(w13[held], w2[held], Target(torch.device("cpu"), torch.float32)),
                    TorchExperts.build(w13[held], w2[held], Target(torch.device("cpu"), torch.float32, relayout=False))):
        calls: list[int] = []

        def counted(*args, _backend=backend, _calls=calls):
            _calls.append(1)
            return _backend(*args)

        got = run_held(counted, rows_of, xs, local_ids, local_weights)
        assert len(calls) == 1, f"{type(backend).__name__}: {len(calls)} calls"
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "num_tokens,hidden,inter,num_experts,top_k",
    # 1 token: one row per tile; 32: a decode step's handful of rows per expert; 90 and 13 experts' worth
    # of rows: tiles of up to twelve rows and a last short one; 700 (skewed): one expert has more rows than
    # one block (128) and several panels pass each block.
    [(1, 64, 32, 8, 2), (32, 64, 96, 8, 2), (90, 32, 16, 4, 2), (13, 96, 48, 6, 3), (700, 64, 32, 4, 2)],
)
def test_moe_experts_from_panels_match_the_checkpoint_layout(num_tokens, hidden, inter, num_experts, top_k):
    x, w13, w2, ids, weights = expert_layer(num_tokens, hidden, inter, num_experts, top_k, seed=5)
    p13, p2 = native.pack_experts(w13, w2)
    assert p13.shape == (num_experts, inter // 16, hidden, 32) and p2.shape == (num_experts, hidden // 32, inter, 32)
    # Panel 0 of p13: the gate rows 0..15, then the up rows 0..15, column by column of the input.
    torch.testing.assert_close(p13[0, 0, 3], torch.cat([w13[0, :16, 3], w13[0, inter:inter + 16, 3]]), rtol=0, atol=0)
    unpacked = native.unpack_experts(p13, p2)
    assert torch.equal(unpacked[0], w13) and torch.equal(unpacked[1], w2)
    for expert_ids in (None, [e for e in range(num_experts) if e % 2 == 0], []):
        got = native.moe_experts(x, ids, weights, p13, p2, expert_ids)
        expected = reference_experts(x, ids, weights, w13, w2, expert_ids)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_panels_reject_sizes_they_cannot_hold_and_mismatched_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        native.pack_experts(torch.randn(2, 64, 48), torch.randn(2, 48, 32))  # hidden 48
    with pytest.raises(ValueError, match="multiple of 32"):
        native.pack_experts(torch.randn(2, 40, 64), torch.randn(2, 64, 20))  # intermediate 20
    assert native.experts_packable(64, 32) and not native.experts_packable(48, 32) and not native.experts_packable(64, 24)
    x, ids, weights = torch.randn(4, 64), torch.tensor([[0], [1], [1], [0]]), torch.ones(4, 1)
    p13, p2 = native.pack_experts(torch.randn(2, 64, 64), torch.randn(2, 64, 32))
    with pytest.raises(ValueError, match="shapes"):
        native.moe_experts(x, ids, weights, p13, p2[:, :, :16])
    with pytest.raises(ValueError, match="shapes"):
        native.moe_experts(torch.randn(4, 32), ids, weights, p13, p2)
    with pytest.raises(ValueError, match="topk_ids"):
        native.moe_experts(x, torch.tensor([[0], [2], [1], [0]]), weights, p13, p2)


@pytest.mark.parametrize("rows,in_features,out_features",
                         [(1, 64, 96), (5, 512, 1024), (16, 48, 37), (3, 33, 18), (40, 64, 64), (64, 40, 32)])
def test_linear_matches_f_linear(rows, in_features, out_features):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    bias = torch.randn(out_features, generator=g)
    torch.testing.assert_close(native.linear(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(native.linear(x.view(1, rows, -1), weight, bias), F.linear(x, weight, bias)[None],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        native.linear(x, weight[:, 1:])
    if out_features % 32 == 0:  # the same on panels; 200 rows take more than one block of rows
        panels = native.pack_linear(weight)
        assert panels.shape == (out_features // 32, in_features, 32)
        torch.testing.assert_close(panels[-1, 5], weight[-32:, 5], rtol=0, atol=0)
        assert torch.equal(native.unpack_linear(panels), weight), "the panels must unpack to the weight exactly"
        torch.testing.assert_close(native.linear(x.view(1, rows, -1), panels, bias), F.linear(x, weight, bias)[None],
                                   rtol=1e-4, atol=1e-5)
        tall = torch.randn(200, in_features, generator=g)
        torch.testing.assert_close(native.linear(tall, panels), F.linear(tall, weight), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="shapes"):
            native.linear(x[:, 1:], panels)
    else:
        with pytest.raises(ValueError, match="multiple of 32"):
            native.pack_linear(weight)


def reference_rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(1, 64), (32, 512), (3, 5, 40), (300, 384), (4, 7)])  # 300 x 384: threads split the rows
def test_rms_norm_and_the_fused_residual_add_match_pytorch(shape):
    g = torch.Generator().manual_seed(5)
    x, residual = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    weight = torch.rand(shape[-1], generator=g) + 0.5
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-6)
    before = x.clone(), residual.clone()
    normed, summed = native.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, x + residual), "the residual stream must be the exact sum"
    torch.testing.assert_close(normed, reference_rms_norm(x + residual, weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1]), "the inputs were modified"
    with pytest.raises(ValueError, match="shapes"):
        native.rms_norm(x, weight[1:], 1e-6)
    with pytest.raises(ValueError, match="shapes"):
        native.rms_norm(x, weight, 1e-6, residual[..., 1:])


@pytest.mark.parametrize("rows,num_heads,num_kv_heads,head_dim", [(32, 8, 4, 64), (1, 4, 4, 32), (5, 6, 2, 40), (300, 8, 2, 64)])
def test_rotary_store_matches_apply_rotary_and_the_cache_write(rows, num_heads, num_kv_heads, head_dim):
    from moemesh.worker.models.layers import RotaryEmbedding
    from moemesh.worker.ops.attention import apply_rotary

    g = torch.Generator().manual_seed(6)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(rows, q_size + 2 * kv_size, generator=g)  # q, k, v as views of one fused projection
    q, k, v = (t.view(rows, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.randint(0, 4000, (rows,), generator=g))
    block_size, num_blocks = 4, rows // 4 + 6
    slots = torch.randperm(num_blocks * block_size, generator=g)[:rows]  # scattered, as the block manager hands out
    cache_k, cache_v = paged_cache(num_blocks, block_size, num_kv_heads, head_dim, seed=7)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    expected_k.view(-1, num_kv_heads, head_dim)[slots] = apply_rotary(k, cos, sin)
    expected_v.view(-1, num_kv_heads, head_dim)[slots] = v
    got_q = native.rotary_store(q, k, v, cos, sin, slots, cache_k, cache_v)
    torch.testing.assert_close(got_q, apply_rotary(q, cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_k, expected_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache_v, expected_v)


def test_rotary_store_rejects_bad_slots_and_writes_nothing():
    cache_k, cache_v = paged_cache(2, 4, 2, 16)
    before = cache_k.clone(), cache_v.clone()
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    cos, sin = torch.randn(3, 16), torch.randn(3, 16)
    for bad in ([0, 1, 8], [0, -1, 2]):
        with pytest.raises(ValueError, match="out of range"):
            native.rotary_store(q, k, v, cos, sin, torch.tensor(bad), cache_k, cache_v)
    assert torch.equal(cache_k, before[0]) and torch.equal(cache_v, before[1]), "a rejected call wrote to the cache"
    with pytest.raises(ValueError, match="shapes"):
        native.rotary_store(q, k, v, cos[:, :8], sin[:, :8], torch.tensor([0, 1, 2]), cache_k, cache_v)
    with pytest.raises(ValueError, match="float32"):
        native.rotary_store(q, k, v, cos, sin, torch.tensor([0, 1, 2]), cache_k.bfloat16(), cache_v.bfloat16())
    assert torch.equal(cache_k, before[0]) and torch.equal(cache_v, before[1]), "a rejected call wrote to the cache"


@pytest.mark.parametrize("rows,hidden,num_experts,top_k", [(32, 512, 8, 2), (1, 64, 60, 4), (7, 40, 6, 1), (300, 64, 16, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_softmax_top_k(rows, hidden, num_experts, top_k, renormalize):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(rows, hidden, generator=g)
    weight = torch.randn(num_experts, hidden, generator=g) / hidden**0.5
    probs = F.linear(x, weight).softmax(dim=-1)
    expected_weights, expected_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        expected_weights = expected_weights / expected_weights.sum(dim=-1, keepdim=True)
    ids, weights = native.route(x, weight, top_k, renormalize)
    assert ids.dtype == torch.int64 and torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        native.route(x, weight, num_experts + 1, renormalize)


def test_the_build_is_cached_and_a_failed_build_leaves_the_pytorch_path(tmp_path, monkeypatch):
    compiler = shutil.which("cc") or shutil.which("gcc")
    first = native.build_library(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build_library(compiler, tmp_path) == first and first.stat().st_mtime_ns == stamp, "rebuilt needlessly"

    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("MOEMESH_CACHE_DIR", str(tmp_path / "other"))
    failed = native.load_kernels.__wrapped__()
    assert not failed.available and "failed" in failed.reason
    monkeypatch.setenv("MOEMESH_NATIVE_KERNELS", "0")
    assert "MOEMESH_NATIVE_KERNELS" in native.load_kernels.__wrapped__().reason


def test_loading_the_kernels_leaves_the_process_float_environment_alone():
    # A library linked with -ffast-math would switch the whole process to flushing subnormals to zero.
    smallest = 5e-324  # the smallest positive subnormal double
    assert smallest * 1.0 > 0.0, "subnormal doubles are flushed to zero in this process"
    assert torch.tensor(1e-40, dtype=torch.float32).mul(1.0).item() > 0.0, "subnormal floats are flushed to zero"
