"""Every backend of every operation in worker/ops that this machine offers, against the plain PyTorch reference.

Each test builds one entry of an operation's backend table on the same
inputs and compares it with a reference written here from the definition,
independently of the backends. A backend this machine cannot run (the native
kernels without a C compiler, oneDNN off x86-64) reports as skipped. Batch
sizes straddle the backends' own size thresholds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk
from moemesh.worker.models.layers import Linear, RotaryEmbedding
from moemesh.worker.ops import native
from moemesh.worker.ops.attention import (
    ATTENTION_BACKENDS,
    NativeAttention,
    TorchAttention,
    TritonAttention,
    apply_rotary,
    choose_attention,
)
from moemesh.worker.ops.backends import Target
from moemesh.worker.ops.experts import (
    EXPERTS_BACKENDS,
    Grouping,
    NativeExperts,
    OneDNNExperts,
    TorchExperts,
    TritonExperts,
    choose_experts,
)
from moemesh.worker.ops.gpu import triton_kernels
from moemesh.worker.ops.linear import (
    LINEAR_BACKENDS,
    NATIVE_LINEAR_ROWS,
    NATIVE_PANEL_ROWS,
    NativeLinear,
    OneDNNLinear,
    TorchLinear,
    choose_linear,
)
from moemesh.worker.ops.norm import RMS_NORM_BACKENDS, NativeRMSNorm, TorchRMSNorm, TritonRMSNorm, choose_rms_norm
from moemesh.worker.ops.packing import packing_available
from moemesh.worker.ops.router import ROUTER_BACKENDS, NativeRouter, TorchRouter, choose_router
from tests.support.references import reference_experts

CPU = torch.device("cpu")
# Tolerances of the native kernels' own tests: float32 sums in another order.
RTOL, ATOL = 1e-4, 1e-5


def name(backend: type) -> str:
    return backend.__name__


def target(relayout: bool = True, dtype: torch.dtype = torch.float32) -> Target:
    """A CPU target of `dtype`; skips nothing by itself."""
    return Target(CPU, dtype, relayout)


def require(backend: type, where: Target) -> None:
    """Skip the test when `backend` does not serve `where` on this machine."""
    if not backend.serves(where):
        pytest.skip(f"{backend.__name__} does not serve {where} here")


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- the choice --------------------------------------------------------------------------------------------------


def no_compiler(monkeypatch) -> None:
    """The native kernels absent, as on a machine without a C compiler (the seam the model tests use too)."""
    monkeypatch.setattr(native, "load_kernels", lambda: native.Kernels(None, "turned off by the test"))


def chosen_types(where: Target) -> list[type]:
    """The backend type each operation chooses for `where`."""
    w = randn(64, 64, seed=0)
    w13, w2 = randn(4, 64, 64, seed=1), randn(4, 64, 32, seed=2)
    return [
        type(choose_linear(w, None, where)),
        type(choose_experts(w13, w2, where)),
        type(choose_attention(4, 2, 16, where)),
        type(choose_rms_norm(w[0], 1e-6, where)),
        type(choose_router(w[:8], 2, True, where)),
    ]


def test_each_operation_chooses_the_first_backend_that_serves_the_target(monkeypatch):
    native_here = native.load_kernels().available
    onednn_here = packing_available(CPU, torch.float32)
    natives = [NativeLinear, NativeExperts, NativeAttention, NativeRMSNorm, NativeRouter]
    portable = [OneDNNLinear if onednn_here else TorchLinear, OneDNNExperts if onednn_here else TorchExperts,
                TorchAttention, TorchRMSNorm, TorchRouter]
    assert chosen_types(target()) == (natives if native_here else portable)
    no_compiler(monkeypatch)
    assert chosen_types(target()) == portable, "without the native kernels, oneDNN and PyTorch serve"
    torch_only = [TorchLinear, TorchExperts, TorchAttention, TorchRMSNorm, TorchRouter]
    assert chosen_types(target(relayout=False)) == torch_only, "no re-layout: the plain weights, read by PyTorch"
    # CUDA (any dtype): the Triton experts, attention and norm where Triton is installed, else PyTorch; the
    # target alone decides, so no GPU is needed to check it.
    cuda = Target(torch.device("cuda"), torch.bfloat16)
    with_triton = [TorchLinear, TritonExperts, TritonAttention, TritonRMSNorm, TorchRouter]
    assert chosen_types(cuda) == (with_triton if triton_kernels() else torch_only)
    monkeypatch.setenv("MOEMESH_TRITON_KERNELS", "0")
    assert chosen_types(cuda) == torch_only, "MOEMESH_TRITON_KERNELS=0 leaves CUDA to PyTorch"


def test_the_native_projection_hands_larger_batches_to_the_next_backend():
    where = target()
    require(NativeLinear, where)
    weight = randn(96, 64, seed=3)
    on_panels = choose_linear(weight, None, where)
    assert on_panels.panels is not None and on_panels.reads_plain_weight == (on_panels.packed is None)
    assert type(on_panels.larger) is (OneDNNLinear if packing_available(CPU, torch.float32) else TorchLinear)
    plain = choose_linear(weight[:40], None, where)  # 40 outputs: no panels, the kernel reads the plain weight
    assert plain.panels is None and plain.reads_plain_weight
    assert type(choose_linear(weight, None, target(relayout=False)).larger) is TorchLinear


def test_a_module_used_before_the_backends_are_chosen_says_so():
    with pytest.raises(RuntimeError, match="no backend chosen"):
        Linear(4, 4)(torch.randn(2, 4))


# --- linear ------------------------------------------------------------------------------------------------------

# Around the native kernel's limits: NATIVE_LINEAR_ROWS on the plain layout, NATIVE_PANEL_ROWS on panels.
LINEAR_ROWS = (1, 8, NATIVE_LINEAR_ROWS, NATIVE_LINEAR_ROWS + 1, NATIVE_PANEL_ROWS, NATIVE_PANEL_ROWS + 1, 200)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS, ids=name)
@pytest.mark.parametrize("relayout", [True, False], ids=["relayout", "checkpoint-layout"])
@pytest.mark.parametrize("out_features", [96, 40])  # 96 fits panels of 32 output columns, 40 does not
def test_linear_backends_match_f_linear(backend, relayout, out_features):
    where = target(relayout)
    require(backend, where)
    weight, bias = randn(out_features, 64, seed=4, scale=64**-0.5), randn(out_features, seed=5)
    for with_bias in (None, bias):
        op = backend.build(weight, with_bias, where)
        for rows in LINEAR_ROWS:
            x = randn(rows, 64, seed=rows)
            torch.testing.assert_close(op(x), F.linear(x, weight, with_bias), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, rows=rows: f"{backend.__name__}, {rows} rows: {m}")
        x = randn(3, 5, 64, seed=6)  # leading dims are kept
        torch.testing.assert_close(op(x), F.linear(x, weight, with_bias), rtol=RTOL, atol=ATOL)
    assert op(torch.empty(0, 64)).shape == (0, out_features)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS, ids=name)
def test_linear_backends_in_bfloat16_stay_within_its_rounding(backend):
    where = target(dtype=torch.bfloat16)
    require(backend, where)
    weight, x = randn(96, 64, seed=7, scale=64**-0.5), randn(40, 64, seed=8)
    got = backend.build(weight.bfloat16(), None, where)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x, weight), rtol=2e-2, atol=2e-2)


# --- experts -----------------------------------------------------------------------------------------------------


def expert_layer(num_tokens: int, hidden: int, inter: int, num_experts: int = 8, top_k: int = 2, skew: bool = False):
    """Random x [T, H], weights w13 [E, 2I, H] and w2 [E, H, I], and a top-k routing (`skew`: expert 0 favoured)."""
    x = randn(num_tokens, hidden, seed=num_tokens)
    w13, w2 = randn(num_experts, 2 * inter, hidden, seed=9, scale=hidden**-0.5), randn(num_experts, hidden, inter, seed=10,
                                                                                        scale=inter**-0.5)
    scores = torch.rand(num_tokens, num_experts, generator=torch.Generator().manual_seed(11))
    if skew:
        scores[:, 0] += 1.0
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(12))
    return x, w13, w2, ids, weights


# 1 token: two experts busy; 32: every expert busy (the stacked bmm of TorchExperts); skewed: the per-expert loop;
# 300 tokens: more rows per expert than the stacked path takes (64).
EXPERT_BATCHES = [(1, False), (32, False), (32, True), (300, False)]


@pytest.mark.parametrize("backend", EXPERTS_BACKENDS, ids=name)
@pytest.mark.parametrize("relayout", [True, False], ids=["relayout", "checkpoint-layout"])
@pytest.mark.parametrize("hidden,inter", [(64, 32), (48, 40)], ids=["panel-sizes", "other-sizes"])
@pytest.mark.parametrize("num_tokens,skew", EXPERT_BATCHES, ids=[f"{t}{'-skewed' if s else ''}" for t, s in EXPERT_BATCHES])
def test_expert_backends_match_the_per_expert_reference(backend, relayout, hidden, inter, num_tokens, skew):
    where = target(relayout)
    require(backend, where)
    x, w13, w2, ids, weights = expert_layer(num_tokens, hidden, inter, skew=skew)
    op = backend.build(w13, w2, where)
    torch.testing.assert_close(op(x, ids, weights), reference_experts(x, ids, weights, w13, w2), rtol=RTOL, atol=ATOL)
    # Partial outputs over a partition of the experts (what expert parallelism sums) add up to the whole.
    parts = [op(x, ids, weights, expert_ids=range(first, 8, 3)) for first in range(3)]
    torch.testing.assert_close(sum(parts), op(x, ids, weights), rtol=1e-5, atol=1e-6)
    odd = [e for e in range(8) if e % 2]
    torch.testing.assert_close(op(x, ids, weights, expert_ids=odd), reference_experts(x, ids, weights, w13, w2, odd),
                               rtol=RTOL, atol=ATOL)
    # Choices not taken (-1, as an expert-parallel rank gets them) count for nothing, whatever their weight.
    untaken = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    untaken[0, 0] = True
    torch.testing.assert_close(op(x, ids.masked_fill(untaken, -1), weights),
                               reference_experts(x, ids, weights.masked_fill(untaken, 0.0), w13, w2), rtol=RTOL, atol=ATOL)
    assert torch.equal(op(x, ids, weights, expert_ids=[]), torch.zeros_like(x))


def test_the_pytorch_experts_stacked_matmul_and_loop_agree():
    x, w13, w2, ids, weights = expert_layer(32, 64, 32)
    op = TorchExperts(w13, w2)
    grouping = Grouping.of(ids, weights, 8)
    assert op.stack_pays(grouping.counts), "every expert busy, little padding: the stacked path should be taken"
    skewed = Grouping.of(*expert_layer(32, 64, 32, skew=True)[3:], 8)
    assert not op.stack_pays(skewed.counts), "a skewed routing pads too much for the stacked path"
    torch.testing.assert_close(op.stacked(x, grouping), op.looped(x, grouping, None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", EXPERTS_BACKENDS, ids=name)
def test_expert_backends_in_bfloat16_stay_within_its_rounding(backend):
    where = target(dtype=torch.bfloat16)
    require(backend, where)
    x, w13, w2, ids, weights = expert_layer(32, 64, 32)
    got = backend.build(w13.bfloat16(), w2.bfloat16(), where)(x.bfloat16(), ids, weights)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference_experts(x, ids, weights, w13, w2), rtol=3e-2, atol=3e-2)


# --- attention ---------------------------------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 4


def attention_batch(chunks: list[SequenceChunk], window: int | None, dtype: torch.dtype, device: torch.device = CPU):
    """A one-layer cache of random earlier keys and values, the batch of `chunks`, and their new q, k, v, cos, sin."""
    num_blocks = 1 + max(max(c.block_table) for c in chunks)
    cache = PagedKVCache(1, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype, device)
    cache.k[0].copy_(randn(*cache.k[0].shape, seed=13))
    cache.v[0].copy_(randn(*cache.v[0].shape, seed=14))
    batch = ForwardBatch.build(chunks, BLOCK, [window], device)
    N = batch.num_tokens
    q, k, v = randn(N, HEADS, HEAD_DIM, seed=15), randn(N, KV_HEADS, HEAD_DIM, seed=16), randn(N, KV_HEADS, HEAD_DIM, seed=17)
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0)(batch.positions)
    return cache, batch, *(t.to(device=device, dtype=dtype) for t in (q, k, v)), cos, sin


def reference_attention(q, keys, values, positions, window):
    """Row by row: q [nh, D] against keys, values [L, n_kv, D] at positions [0, L), causal and windowed."""
    group = HEADS // KV_HEADS
    out = []
    for row_q, pos in zip(q, positions):
        first = 0 if window is None else max(0, pos - window + 1)
        k = keys[first : pos + 1].repeat_interleave(group, dim=1)  # [L, nh, D]
        v = values[first : pos + 1].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", row_q, k) / HEAD_DIM**0.5
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v).reshape(-1))
    return torch.stack(out)


# Three decodes (one group of T = 1), a prefill chunk after cached tokens (T = 5), and the two mixed in one batch.
DECODES = [SequenceChunk([1], 6, [3, 0]), SequenceChunk([2], 9, [5, 1, 6]), SequenceChunk([3], 13, [2, 7, 4, 8])]
PREFILL = [SequenceChunk([4, 5, 6, 7, 8], 3, [9, 10])]
BATCHES = {"decode": DECODES, "prefill": PREFILL, "mixed": DECODES + PREFILL}


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, ids=name)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kind", sorted(BATCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_backends_match_the_reference(backend, window, kind, dtype):
    where = target(dtype=dtype)
    require(backend, where)
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    cache, batch, q, k, v, cos, sin = attention_batch(BATCHES[kind], window, dtype)
    expected_k, expected_v = cache.k[0].clone(), cache.v[0].clone()
    expected_k.view(-1, KV_HEADS, HEAD_DIM)[batch.slots] = apply_rotary(k, cos, sin)
    expected_v.view(-1, KV_HEADS, HEAD_DIM)[batch.slots] = v
    op = backend(HEADS, KV_HEADS, HEAD_DIM, where)
    rotated = op.rotate_and_store(q, k, v, cos, sin, batch.slots, cache, 0)
    torch.testing.assert_close(rotated, apply_rotary(q, cos, sin), **tol)
    torch.testing.assert_close(cache.k[0], expected_k, **tol)
    assert torch.equal(cache.v[0], expected_v), "values are stored as given"
    for group in batch.groups:
        queries = rotated[group.start : group.stop]  # [B*T, nh, D]
        got = op.attend(queries, group, cache, 0, window)
        for b in range(group.num_seqs):
            rows = slice(b * group.num_tokens, (b + 1) * group.num_tokens)
            slots = [block * BLOCK + offset for block in group.block_tables[b].tolist() for offset in range(BLOCK)]
            keys, values = expected_k.view(-1, KV_HEADS, HEAD_DIM)[slots], expected_v.view(-1, KV_HEADS, HEAD_DIM)[slots]
            expected = reference_attention(queries[rows].float(), keys.float(), values.float(),
                                           group.query_positions[rows], window)
            context = f"{kind}: sequence {b} of a group of T={group.num_tokens}"
            torch.testing.assert_close(got[rows].float(), expected, **tol, msg=lambda m, context=context: f"{context}: {m}")


# --- norm and router ---------------------------------------------------------------------------------------------


def reference_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("backend", RMS_NORM_BACKENDS, ids=name)
@pytest.mark.parametrize("shape", [(1, 64), (32, 512), (3, 5, 40), (300, 384)])
def test_rms_norm_backends_match_the_reference(backend, shape):
    where = target()
    require(backend, where)
    x, residual, weight = randn(*shape, seed=18), randn(*shape, seed=19), torch.rand(shape[-1]) + 0.5
    op = backend(weight, 1e-6)
    torch.testing.assert_close(op(x), reference_rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-6)
    normed, summed = op.add_norm(x, residual)
    assert torch.equal(summed, x + residual), "the residual stream must be the exact sum"
    torch.testing.assert_close(normed, reference_rms_norm(x + residual, weight, 1e-6), rtol=1e-5, atol=1e-6)


def test_the_pytorch_rms_norm_computes_in_float32_and_returns_the_input_dtype():
    x, weight = randn(4, 64, seed=20).bfloat16(), (torch.rand(64) + 0.5).bfloat16()
    got = TorchRMSNorm(weight, 1e-6)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference_rms_norm(x, weight, 1e-6), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ROUTER_BACKENDS, ids=name)
@pytest.mark.parametrize("rows,num_experts,top_k", [(1, 60, 4), (32, 8, 2), (300, 16, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_backends_match_softmax_top_k(backend, rows, num_experts, top_k, renormalize):
    where = target()
    require(backend, where)
    x, weight = randn(rows, 64, seed=21), randn(num_experts, 64, seed=22, scale=64**-0.5)
    expected_weights, expected_ids = F.linear(x, weight).softmax(dim=-1).topk(top_k, dim=-1)
    if renormalize:
        expected_weights = expected_weights / expected_weights.sum(dim=-1, keepdim=True)
    ids, weights = backend(weight, top_k, renormalize)(x)
    assert ids.dtype == torch.int64 and torch.equal(ids, expected_ids)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
