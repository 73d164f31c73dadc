"""The Triton kernels of worker/ops/gpu against the PyTorch references: compiled on a GPU, interpreted on the CPU.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before Triton is
imported, and Triton's interpreter runs each kernel program by program in
NumPy: the kernels' logic (sorting and padding by expert, the grouped GEMMs
and their fused epilogues, the online softmax over paged blocks, masks and
windows) is checked on small shapes without a GPU. With one, the same tests
run the compiled kernels on it. The backends are built around the kernels
and compared with the PyTorch backends on the same inputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk
from moemesh.worker.models.layers import RotaryEmbedding
from moemesh.worker.ops import gpu
from moemesh.worker.ops.attention import TorchAttention, TritonAttention
from moemesh.worker.ops.backends import Target
from moemesh.worker.ops.experts import TorchExperts, TritonExperts
from moemesh.worker.ops.norm import TorchRMSNorm, TritonRMSNorm
from tests.model.test_ops import (
    BATCHES,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    attention_batch,
    expert_layer,
    randn,
    reference_attention,
)
from tests.support.references import reference_experts

pytest.importorskip("triton", reason="the Triton kernels are tested where Triton is installed (a test dependency)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
              torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
DTYPES = list(TOLERANCES)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, by name (imported here: Triton is a test dependency, and CI imports it interpreted)."""
    from moemesh.worker.ops.gpu import attention, moe

    return {"moe": moe, "attention": attention}


def test_kernels_are_interpreted_exactly_when_there_is_no_gpu(kernels):
    assert kernels["moe"].INTERPRETED == (DEVICE.type == "cpu"), "tests/conftest.py sets TRITON_INTERPRET without a GPU"


def on_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEVICE) for t in tensors)


# --- the fused MoE ---------------------------------------------------------------------------------------------

# (tokens, hidden, intermediate, top_k, skewed): one token (two experts busy), a decode-sized batch, sizes that
# are not multiples of the blocks, top-3, and a routing where expert 0 gets most rows (several blocks of it).
MOE_CASES = [(1, 64, 32, 2, False), (9, 64, 48, 2, False), (21, 48, 40, 3, False), (40, 64, 32, 2, True)]
MOE_IDS = [f"T{t}-H{h}-I{i}-k{k}" + ("-skewed" if skew else "") for t, h, i, k, skew in MOE_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden,inter,top_k,skew", MOE_CASES, ids=MOE_IDS)
def test_the_fused_moe_matches_the_per_expert_reference(kernels, dtype, tokens, hidden, inter, top_k, skew):
    x, w13, w2, ids, weights = on_device(*expert_layer(tokens, hidden, inter, top_k=top_k, skew=skew))
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    config = kernels["moe"].MoEConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    op = TritonExperts(w13, w2, kernels=kernels["moe"])
    got = kernels["moe"].fused_experts(x, ids, weights, w13, w2, config=config)
    assert got.dtype == dtype and got.shape == x.shape
    expected = reference_experts(x.float(), ids, weights, w13.float(), w2.float())
    torch.testing.assert_close(got.float(), expected, **TOLERANCES[dtype])
    torch.testing.assert_close(op(x, ids, weights).float(), TorchExperts(w13, w2)(x, ids, weights).float(),
                               **TOLERANCES[dtype], msg="the Triton backend strays from the PyTorch backend")


def test_partial_outputs_over_a_partition_of_the_experts_sum_to_the_whole(kernels):
    x, w13, w2, ids, weights = on_device(*expert_layer(13, 64, 32))
    op = TritonExperts(w13, w2, kernels=kernels["moe"])
    whole = op(x, ids, weights)
    parts = [op(x, ids, weights, expert_ids=range(first, 8, 3)) for first in range(3)]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-5, atol=1e-6)
    odd = [e for e in range(8) if e % 2]
    torch.testing.assert_close(op(x, ids, weights, expert_ids=odd), reference_experts(x, ids, weights, w13, w2, odd),
                               **TOLERANCES[torch.float32])
    assert torch.equal(op(x, ids, weights, expert_ids=[]), torch.zeros_like(x))


def test_untaken_choices_are_skipped_as_if_they_weighed_nothing(kernels):
    # A rank of an expert-parallel replica gets rows with fewer choices than k, the rest -1: one launch takes them.
    x, w13, w2, ids, weights = on_device(*expert_layer(17, 64, 32, top_k=3))
    untaken = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.4
    untaken[3] = True  # a row with no choice at all
    op = TritonExperts(w13, w2, kernels=kernels["moe"])
    got = op(x, ids.masked_fill(untaken, -1), weights)  # the untaken choices' weights are ignored
    expected = reference_experts(x, ids.clamp(min=0), weights.masked_fill(untaken, 0.0), w13, w2)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])
    assert not got[3].any()
    odd = [e for e in range(8) if e % 2]  # with a subset of the experts as well
    expected_odd = reference_experts(x, ids.masked_fill(untaken, 0), weights.masked_fill(untaken, 0.0), w13, w2, odd)
    torch.testing.assert_close(op(x, ids.masked_fill(untaken, -1), weights, expert_ids=odd), expected_odd,
                               **TOLERANCES[torch.float32])


def test_a_token_gets_the_same_output_alone_or_in_a_batch(kernels):
    x, w13, w2, ids, weights = on_device(*expert_layer(24, 64, 32, skew=True))
    op = TritonExperts(w13, w2, kernels=kernels["moe"])
    together = op(x, ids, weights)
    alone = torch.cat([op(x[i : i + 1], ids[i : i + 1], weights[i : i + 1]) for i in range(0, 24, 5)])
    # Equal to rounding: the blocks a token's rows share differ, and so may the dot's order of additions.
    torch.testing.assert_close(together[0:24:5], alone, rtol=1e-5, atol=1e-6)


def test_alignment_gives_each_block_one_expert_and_every_assignment_one_row(kernels):
    moe = kernels["moe"]
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3], [3, 2]], device=DEVICE)  # expert 3 has 5, the others fewer
    aligned = moe.align(ids, num_experts=6, block_m=4)
    rows, experts = aligned.sorted_rows.tolist(), aligned.block_expert.tolist()
    used = int(aligned.num_padded)
    assert used == 4 * (1 + 1 + 1 + 2 + 0 + 1), "each expert's run is padded to whole blocks of 4"
    assert sorted(r for r in rows if r < ids.numel()) == list(range(ids.numel())), "every assignment gets one row"
    for block, expert in enumerate(experts[: used // 4]):
        members = [r for r in rows[block * 4 : (block + 1) * 4] if r < ids.numel()]
        assert members and all(int(ids.flatten()[r]) == expert for r in members), f"block {block} mixes experts"
    assert all(e == 6 for e in experts[used // 4 :]), "blocks past the last run belong to no expert"
    subset = moe.align(ids, num_experts=6, block_m=4, expert_ids=[0, 5])
    kept = [r for r in subset.sorted_rows.tolist() if r < ids.numel()]
    assert sorted(ids.flatten()[torch.tensor(kept, device=DEVICE)].tolist()) == [0, 0, 5]
    assert int(subset.num_padded) == 8


def test_block_sizes_come_from_the_tuned_table_for_the_device_else_a_heuristic(kernels, tmp_path, monkeypatch):
    moe = kernels["moe"]
    monkeypatch.setenv("MOEMESH_CACHE_DIR", str(tmp_path))
    moe.forget_tuned()
    cpu = torch.device("cpu")
    assert moe.moe_config(32, 8, 2048, 5632, cpu).block_m == 16, "decode-sized: 4 rows per expert"
    assert moe.moe_config(32 * 1024, 8, 2048, 5632, cpu).block_m == 64, "prefill-sized: 4096 rows per expert"
    tuned = moe.MoEConfig(block_m=32, block_n=128, block_k=64, num_warps=8, num_stages=4)
    moe._store_tuned("cpu", moe._shape_key(100, 8, 2048, 5632), tuned)
    assert moe.moe_config(120, 8, 2048, 5632, cpu) == tuned, "a tuned entry serves its power-of-two bucket (65..128)"
    assert moe.moe_config(129, 8, 2048, 5632, cpu) != tuned
    stored = json.loads((tmp_path / "triton" / moe.TUNED_FILE).read_text())
    assert stored["cpu"]["E=8,H=2048,I=5632,M=128"]["block_n"] == 128
    moe.forget_tuned()


# --- paged decode attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_triton_attention_matches_the_reference_and_the_pytorch_backend(kernels, dtype, window, kind):
    where = Target(DEVICE, dtype)
    tol = TOLERANCES[dtype]
    cache, batch, q, k, v, cos, sin = attention_batch(BATCHES[kind], window, dtype, DEVICE)
    op = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, where, kernels=kernels["attention"])
    rotated = op.rotate_and_store(q, k, v, cos, sin, batch.slots, cache, 0)
    torch_op = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, where)
    for group in batch.groups:
        queries = rotated[group.start : group.stop]
        got = op.attend(queries, group, cache, 0, window)
        torch.testing.assert_close(got.float(), torch_op.attend(queries, group, cache, 0, window).float(), **tol)
        for b in range(group.num_seqs):
            rows = slice(b * group.num_tokens, (b + 1) * group.num_tokens)
            slots = [blk * cache.block_size + o for blk in group.block_tables[b].tolist() for o in range(cache.block_size)]
            keys = cache.k[0].view(-1, KV_HEADS, HEAD_DIM)[slots].float()
            values = cache.v[0].view(-1, KV_HEADS, HEAD_DIM)[slots].float()
            expected = reference_attention(queries[rows].float(), keys, values, group.query_positions[rows], window)
            torch.testing.assert_close(got[rows].float(), expected, **tol)


def test_decode_attention_with_a_group_of_three_odd_head_size_and_long_scattered_tables(kernels):
    heads, kv_heads, head_dim, block = 6, 2, 24, 8
    g = torch.Generator().manual_seed(5)
    k_cache = torch.randn(20, block, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(20, block, kv_heads, head_dim, generator=g)
    tables = torch.tensor([[17, 3, 9, 0, 12], [4, 19, 0, 0, 0], [1, 2, 5, 6, 7]])
    lengths = torch.tensor([37, 9, 40])  # mid-block, one past a block, all five full
    q = torch.randn(3, heads, head_dim, generator=g)
    args = on_device(q, k_cache, v_cache, tables, lengths)
    for window in (None, 11):
        got = kernels["attention"].paged_decode_attention(*args, window).cpu()
        for b in range(3):
            length = int(lengths[b])
            slots = [int(tables[b, p // block]) * block + p % block for p in range(length)]
            keys = k_cache.view(-1, kv_heads, head_dim)[slots].repeat_interleave(3, dim=1)  # [L, nh, D]
            values = v_cache.view(-1, kv_heads, head_dim)[slots].repeat_interleave(3, dim=1)
            first = 0 if window is None else max(0, length - window)
            scores = torch.einsum("hd,lhd->hl", q[b], keys[first:]) / head_dim**0.5
            expected = torch.einsum("hl,lhd->hd", scores.softmax(-1), values[first:])
            torch.testing.assert_close(got[b], expected, rtol=1e-4, atol=1e-5, msg=f"sequence {b}, window {window}")


def test_a_cache_block_size_the_kernel_cannot_walk_takes_the_pytorch_path(kernels):
    chunks = [SequenceChunk([1], 5, [1, 0])]
    cache, batch, q, k, v, cos, sin = attention_batch(chunks, None, torch.float32, DEVICE)
    assert kernels["attention"].supported_block_size(cache.block_size)
    assert not kernels["attention"].supported_block_size(12)
    with pytest.raises(ValueError, match="power of two"):
        kernels["attention"].paged_decode_attention(q[:1], cache.k[0].repeat(1, 3, 1, 1)[:, :12], cache.v[0][:, :1],
                                                    batch.groups[0].block_tables, batch.groups[0].seq_lens, None)


# --- chunked-prefill attention ----------------------------------------------------------------------------------


# (query heads, KV heads, head size, block, new tokens, cached prefix of the first sequence): groups of three query
# heads per KV head and a head size that is not a power of two, 21 new tokens over two blocks of program rows; and
# 70 new tokens over five, in blocks of 32 positions after a prefix of 45.
PREFILL_SHAPES = [(6, 2, 24, 16, 21, 19), (4, 2, 16, 32, 70, 45)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=["group3", "block32"])
def test_prefill_attention_reads_each_prefix_in_place_causally(kernels, dtype, window, shape):
    # A group of two sequences: one after a cached prefix (its tokens span scattered blocks, the first partly), one
    # with none.
    heads, kv_heads, head_dim, block, new, prefix = shape
    group_size = heads // kv_heads
    g = torch.Generator().manual_seed(7)
    k_cache = torch.randn(12, block, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(12, block, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.tensor([[7, 3, 9, 0, 5], [4, 11, 1, 2, 6]])
    lengths = torch.tensor([prefix + new, new])
    q = torch.randn(2 * new, heads, head_dim, generator=g).to(dtype)
    got = kernels["attention"].paged_prefill_attention(*on_device(q, k_cache, v_cache, tables, lengths), new,
                                                       window).cpu().float()
    tol = TOLERANCES[dtype]
    for b in range(2):
        length = int(lengths[b])
        slots = [int(tables[b, p // block]) * block + p % block for p in range(length)]
        keys = k_cache.float().view(-1, kv_heads, head_dim)[slots].repeat_interleave(group_size, dim=1)  # [L, nh, D]
        values = v_cache.float().view(-1, kv_heads, head_dim)[slots].repeat_interleave(group_size, dim=1)
        for t in range(new):
            pos = length - new + t
            first = 0 if window is None else max(0, pos - window + 1)
            scores = torch.einsum("hd,lhd->hl", q[b * new + t].float(), keys[first : pos + 1]) / head_dim**0.5
            expected = torch.einsum("hl,lhd->hd", scores.softmax(-1), values[first : pos + 1])
            torch.testing.assert_close(got[b * new + t], expected, **tol, msg=f"sequence {b}, token {t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 5])
def test_triton_prefill_groups_match_the_pytorch_backend(kernels, dtype, window):
    block = 16
    chunks = [SequenceChunk(list(range(1, 6)), 19, [3, 1]),  # 5 new tokens after 19 cached: one group of two
              SequenceChunk(list(range(6, 11)), 0, [2]),
              SequenceChunk([11, 12, 13], 30, [0, 4, 5]),  # 3 new tokens: a group of its own
              SequenceChunk([14], 7, [6])]  # a decode in the same batch
    cache = PagedKVCache(1, 7, block, KV_HEADS, HEAD_DIM, dtype, DEVICE)
    cache.k[0].copy_(randn(*cache.k[0].shape, seed=21))
    cache.v[0].copy_(randn(*cache.v[0].shape, seed=22))
    batch = ForwardBatch.build(chunks, block, [window], DEVICE)
    N = batch.num_tokens
    q, k, v = (randn(N, heads, HEAD_DIM, seed=seed).to(device=DEVICE, dtype=dtype)
               for heads, seed in ((HEADS, 23), (KV_HEADS, 24), (KV_HEADS, 25)))
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0)(batch.positions)
    where = Target(DEVICE, dtype)
    op = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, where, kernels=kernels["attention"])
    rotated = op.rotate_and_store(q, k, v, cos, sin, batch.slots, cache, 0)
    torch_op = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, where)
    assert sorted(group.num_tokens for group in batch.groups) == [1, 3, 5]
    for group in batch.groups:
        queries = rotated[group.start : group.stop]
        got = op.attend(queries, group, cache, 0, window)
        torch.testing.assert_close(got.float(), torch_op.attend(queries, group, cache, 0, window).float(),
                                   **TOLERANCES[dtype], msg=f"a group of {group.num_tokens}-token chunks")


def test_prefill_with_blocks_the_kernel_cannot_multiply_takes_the_pytorch_path(kernels):
    attention = kernels["attention"]
    assert attention.supports_prefill(16, 128) and attention.supports_prefill(32, 256)
    assert not attention.supports_prefill(8, 64), "a block under 16 positions"
    assert not attention.supports_prefill(24, 64), "a block that is not a power of two"
    assert not attention.supports_prefill(16, 512), "heads over 256"
    cache, batch, q, k, v, cos, sin = attention_batch(BATCHES["prefill"], None, torch.float32, DEVICE)  # blocks of 4
    group = batch.groups[0]
    with pytest.raises(ValueError, match="at least 16"):
        attention.paged_prefill_attention(q, cache.k[0], cache.v[0], group.block_tables, group.seq_lens,
                                          group.num_tokens, None)
    op = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, Target(DEVICE, torch.float32), kernels=attention)
    rotated = op.rotate_and_store(q, k, v, cos, sin, batch.slots, cache, 0)
    torch_op = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, Target(DEVICE, torch.float32))
    torch.testing.assert_close(op.attend(rotated, group, cache, 0, None), torch_op.attend(rotated, group, cache, 0, None))


class Unbuildable:
    """A kernel whose launch fails as Triton's does when its code does not compile for the device."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.compiler.errors import CompilationError

            self.launches += 1
            raise CompilationError("kernel.py", None, "unsupported operation on this architecture")
        return launch


def test_a_prefill_kernel_that_does_not_fit_the_device_falls_back_once_and_for_good(kernels, monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources

    attention = kernels["attention"]
    launches = []

    class Unfit:  # a kernel whose launch fails as Triton's does when a block needs more than the device has
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                raise OutOfResources(232448, 101376, "shared memory")
            return launch

    monkeypatch.setattr(attention, "_paged_prefill_kernel", Unfit())
    monkeypatch.setattr(gpu, "_failures", {})
    block = 16
    cache = PagedKVCache(1, 3, block, KV_HEADS, HEAD_DIM, torch.float32, DEVICE)
    batch = ForwardBatch.build([SequenceChunk(list(range(1, 9)), 4, [2])], block, [None], DEVICE)
    q, k, v = (randn(8, heads, HEAD_DIM, seed=seed).to(DEVICE) for heads, seed in ((HEADS, 31), (KV_HEADS, 32),
                                                                                      (KV_HEADS, 33)))
    cos, sin = RotaryEmbedding(HEAD_DIM, 10000.0)(batch.positions)
    where = Target(DEVICE, torch.float32)
    op = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, where, kernels=attention)
    rotated = op.rotate_and_store(q, k, v, cos, sin, batch.slots, cache, 0)
    (group,) = batch.groups
    expected = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, where).attend(rotated, group, cache, 0, None)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            torch.testing.assert_close(op.attend(rotated, group, cache, 0, None), expected)
    assert len(launches) == 1, "after one failure the kernel is not launched again"
    assert gpu.unavailable("prefill attention") and "shared memory" in gpu.unavailable("prefill attention")
    assert [r.message for r in caplog.records if "prefill attention" in r.message] and "shared memory" in caplog.text
    assert list(gpu.failures()) == ["prefill attention"], "the other kernels still serve"


# --- the fused small ops ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 16), (0, 32)], ids=["rows", "heads", "empty"])
def test_triton_rms_norm_and_its_residual_add_match_the_pytorch_backend(dtype, shape):
    from moemesh.worker.ops.gpu import layer_ops

    dim = shape[-1]
    weight = (1.0 + 0.1 * randn(dim, seed=41)).to(device=DEVICE, dtype=dtype)
    x = (3.0 * randn(*shape, seed=42)).to(device=DEVICE, dtype=dtype)
    residual = randn(*shape, seed=43).to(device=DEVICE, dtype=dtype)
    fused, reference = TritonRMSNorm(weight, 1e-6, kernels=layer_ops), TorchRMSNorm(weight, 1e-6)
    torch.testing.assert_close(fused(x), reference(x), **TOLERANCES[dtype])
    got, summed = fused.add_norm(x, residual)
    want, want_summed = reference.add_norm(x, residual)
    assert got.shape == summed.shape == x.shape and got.dtype == summed.dtype == dtype
    # The sum is rounded to the dtype as PyTorch rounds it; Triton's interpreter rounds float32 to bfloat16
    # differently (a unit in the last place off), compiled kernels as PyTorch does.
    exact = DEVICE.type == "cuda" or dtype != torch.bfloat16
    torch.testing.assert_close(summed, want_summed, **(dict(rtol=0, atol=0) if exact else TOLERANCES[dtype]))
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_triton_rotary_with_the_cache_write_matches_the_pytorch_backend(kernels, dtype, kind):
    cache, batch, q, k, v, cos, sin = attention_batch(BATCHES[kind], None, dtype, DEVICE)
    reference_cache = PagedKVCache(1, cache.k[0].shape[0], cache.block_size, KV_HEADS, HEAD_DIM, dtype, DEVICE)
    reference_cache.k[0].copy_(cache.k[0]), reference_cache.v[0].copy_(cache.v[0])
    where = Target(DEVICE, dtype)
    fused = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, where, kernels=kernels["attention"])
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    got = fused.rotate_and_store(q, k, v, cos, sin, batch.slots, cache, 0)
    want = TorchAttention(HEADS, KV_HEADS, HEAD_DIM, where).rotate_and_store(q, k, v, cos, sin, batch.slots,
                                                                               reference_cache, 0)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    torch.testing.assert_close(cache.k[0], reference_cache.k[0], **TOLERANCES[dtype])  # the new keys, rotated
    torch.testing.assert_close(cache.v[0], reference_cache.v[0], rtol=0, atol=0)  # the new values, as given
    assert not torch.equal(cache.k[0], randn(*cache.k[0].shape, seed=13).to(device=DEVICE, dtype=dtype))


def test_an_odd_head_size_takes_the_pytorch_rotary(kernels):
    from moemesh.worker.ops.gpu import layer_ops

    assert layer_ops.supports_rotary(128) and not layer_ops.supports_rotary(7)
    with pytest.raises(ValueError, match="even head size"):
        layer_ops.rotary_store(*(torch.zeros(1, 1, 7),) * 3, torch.zeros(1, 7), torch.zeros(1, 7),
                               torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 1, 7), torch.zeros(1, 4, 1, 7))


def test_norm_rotary_and_experts_kernels_that_do_not_build_fall_back_to_pytorch(kernels, monkeypatch):
    from moemesh.worker.ops.gpu import layer_ops

    monkeypatch.setattr(gpu, "_failures", {})
    broken = {name: Unbuildable() for name in ("norm", "rotary", "gate_up")}
    monkeypatch.setattr(layer_ops, "_rms_norm_kernel", broken["norm"])
    monkeypatch.setattr(layer_ops, "_rotary_store_kernel", broken["rotary"])
    monkeypatch.setattr(kernels["moe"], "_gate_up_kernel", broken["gate_up"])
    weight, x, residual = randn(32, seed=51).to(DEVICE), randn(4, 32, seed=52).to(DEVICE), randn(4, 32, seed=53).to(DEVICE)
    norm = TritonRMSNorm(weight, 1e-6, kernels=layer_ops)
    for _ in range(2):
        torch.testing.assert_close(norm.add_norm(x, residual), TorchRMSNorm(weight, 1e-6).add_norm(x, residual))
        torch.testing.assert_close(norm(x), TorchRMSNorm(weight, 1e-6)(x))
    cache, batch, q, k, v, cos, sin = attention_batch(BATCHES["decode"], None, torch.float32, DEVICE)
    op = TritonAttention(HEADS, KV_HEADS, HEAD_DIM, Target(DEVICE, torch.float32), kernels=kernels["attention"],
                         layer_ops=layer_ops)
    for _ in range(2):
        op.rotate_and_store(q, k, v, cos.to(DEVICE), sin.to(DEVICE), batch.slots, cache, 0)
    x, w13, w2, ids, weights = on_device(*expert_layer(4, 32, 16, 6, 2))
    experts = TritonExperts(w13, w2, kernels=kernels["moe"])
    for _ in range(2):
        torch.testing.assert_close(experts(x, ids, weights), TorchExperts(w13, w2)(x, ids, weights))
    assert {name: kernel.launches for name, kernel in broken.items()} == {"norm": 1, "rotary": 1, "gate_up": 1}
    assert sorted(gpu.failures()) == ["fused MoE", "rms_norm", "rotary with the cache write"]


def test_only_build_failures_fall_back_other_errors_pass_through(monkeypatch):
    monkeypatch.setattr(gpu, "_failures", {})

    def fails(exc):
        def run():
            raise exc
        return run

    with pytest.raises(gpu.KernelUnavailable):
        gpu.launch("lowering", fails(RuntimeError("PassManager::run failed")))
    for error in (RuntimeError("CUDA error: an illegal memory access was encountered"), ValueError("a bad argument")):
        with pytest.raises(type(error)):
            gpu.launch("other", fails(error))
    assert list(gpu.failures()) == ["lowering"], "only a build failure marks a kernel unavailable"
