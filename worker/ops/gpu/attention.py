"""Decode attention that reads the paged KV cache in place: one Triton program per (sequence, KV head).

Each program takes the query heads that share one KV head (grouped-query
attention), walks its sequence's block table, and keeps an online softmax
(running maximum, running sum, running weighted values) over each block of
`block_size` key positions, so no key or value is copied out of the cache
first (the PyTorch path gathers every sequence's blocks into a dense copy).
A sliding window skips the blocks before it and masks the positions before
it in its first block. Sequence lengths and block tables are read on the
device: a decode step that uses it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr,
    scale, window, head_dim,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    """out[b, h*GROUP + g] = softmax(q . K / sqrt(D)) V over sequence b's cached positions, for KV head h."""
    b, h = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    g_ok, d_ok = g < GROUP, d < head_dim
    heads = h * GROUP + g  # [G] the query heads of KV head h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)  # [G, D]
    first = 0
    if WINDOWED:
        first = tl.maximum(seq_len - window, 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running maximum of the scores
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of exp(score - maximum)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # running sum of those weights times the values
    for j in range(first // BLOCK_S, (seq_len + BLOCK_S - 1) // BLOCK_S):
        block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        pos = j * BLOCK_S + s  # [S] the block's key positions
        ok = (pos < seq_len) & (pos >= first)
        kv_offsets = block * stride_kb + s[:, None] * stride_ks + h * stride_kh + d[None, :]  # [S, D]
        keys = tl.load(k_ptr + kv_offsets, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2) * scale  # [G, S]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])  # [G, S]
        alpha = tl.exp(m_i - m_new)  # rescales what was summed under the old maximum
        values = tl.load(v_ptr + kv_offsets, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [S, D]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def supported_block_size(block_size: int) -> bool:
    """The kernel walks a block as one vector of positions: a power of two (the default 16 is)."""
    return block_size > 0 and block_size & (block_size - 1) == 0


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Decode attention: q [B, nh, D] against each sequence's cached keys -> [B, nh, D].

    k_cache and v_cache [num_blocks, block_size, n_kv, D] (one layer), block_tables [B, nb], seq_lens [B]
    (the keys each sequence attends to, its new token's included); with `window`, the last `window` only.
    """
    B, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if not supported_block_size(block_size):
        raise ValueError(f"block_size {block_size}: the Triton decode kernel needs a power of two")
    group = num_heads // num_kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(B, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        head_dim**-0.5, window or 0, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_S=block_size,
        BLOCK_D=triton.next_power_of_2(head_dim), WINDOWED=window is not None,
    )
    return out
