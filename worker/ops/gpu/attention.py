"""Attention that reads the paged KV cache in place: decode (one Triton program per sequence and KV head) and
chunked prefill (one per sequence, KV head and block of new tokens).

Each program takes the query heads that share one KV head (grouped-query
attention), walks its sequence's block table, and keeps an online softmax
(running maximum, running sum, running weighted values) over each block of
`block_size` key positions, so no key or value is copied out of the cache
first (the PyTorch path gathers every sequence's blocks into a dense copy).
A sliding window skips the blocks before it and masks the positions before
it in its first block. Sequence lengths and block tables are read on the
device: a decode step that uses it can be captured in a CUDA graph.

A prefill program's rows are its tokens times the group's query heads (64
rows); it multiplies them by each cache block's keys, and the weights by the
values, as matrix products, and masks the keys after each token's position
(causal) and before its window. The new tokens' keys are read from the cache
too: the backend writes them there first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.worker.ops.gpu import launch
from moemesh.worker.ops.gpu.moe import INTERPRETED, dot_precision

DECODE, PREFILL = "decode attention", "prefill attention"  # the kernels' names in failure reports


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
    launch(DECODE, lambda: _paged_decode_kernel[(B, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        head_dim**-0.5, window or 0, head_dim,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_S=block_size,
        BLOCK_D=triton.next_power_of_2(head_dim), WINDOWED=window is not None,
    ))
    return out


# ---- chunked prefill -------------------------------------------------------------------------------------------

@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr,
    scale, window, head_dim, num_tokens,
    stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_on, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """A block of BLOCK_M new tokens of sequence b, each with the GROUP query heads of KV head h, against the
    sequence's cached keys up to its own position (causal; the last `window` with WINDOWED)."""
    b, h, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - num_tokens  # the position of the sequence's first new token
    r = tl.arange(0, BLOCK_M * BLOCK_G)  # rows: (token, query head of the group)
    t = m * BLOCK_M + r // BLOCK_G  # the token's index among the new ones
    g = r % BLOCK_G
    d = tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S)
    row_ok = (t < num_tokens) & (g < GROUP)
    d_ok = d < head_dim
    pos = first_pos + t  # [R] each row's position
    q = tl.load(q_ptr + (b * num_tokens + t)[:, None] * stride_qn + (h * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [R, D]
    if UPCAST:  # the interpreter multiplies 16-bit floats wrongly; compiled kernels take them as they are
        q = q.to(tl.float32)
    last = tl.minimum(first_pos + (m + 1) * BLOCK_M, seq_len)  # one past the block's furthest position
    lowest = 0
    if WINDOWED:
        lowest = tl.maximum(first_pos + m * BLOCK_M - window + 1, 0)
    m_i = tl.full((BLOCK_M * BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M * BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M * BLOCK_G, BLOCK_D), dtype=tl.float32)
    for j in range(lowest // BLOCK_S, (last + BLOCK_S - 1) // BLOCK_S):
        block = tl.load(tables_ptr + b * stride_tb + j).to(tl.int64)
        key_pos = j * BLOCK_S + s  # [S]
        kv_offsets = block * stride_kb + s[:, None] * stride_ks + h * stride_kh + d[None, :]  # [S, D]
        key_ok = key_pos < seq_len
        keys = tl.load(k_ptr + kv_offsets, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            keys = keys.to(tl.float32)
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale  # [R, S], float32
        seen = row_ok[:, None] & key_ok[None, :] & (key_pos[None, :] <= pos[:, None])
        if WINDOWED:
            seen = seen & (key_pos[None, :] > pos[:, None] - window)
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp(scores - m_safe[:, None])  # [R, S], 0 where unseen
        alpha = tl.exp(m_i - m_safe)
        values = tl.load(v_ptr + kv_offsets, mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # [S, D]
        if UPCAST:
            values = values.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (b * num_tokens + t)[:, None] * stride_on + (h * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# Rows (token x query head) a prefill program takes: matrix products of at least 16 on each side (tensor cores).
PREFILL_ROWS = 64


def supports_prefill(block_size: int, head_dim: int) -> bool:
    """The prefill kernel multiplies a cache block's keys as one matrix: a power-of-two block of 16 positions or
    more, and heads of up to 256."""
    return supported_block_size(block_size) and block_size >= 16 and 0 < head_dim <= 256


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    num_tokens: int,
    window: int | None,
) -> torch.Tensor:
    """Chunked-prefill attention: q [B * T, nh, D], T new tokens of each of B sequences (already written to the
    cache, the last T positions of each), against each sequence's cached keys, causal -> [B * T, nh, D].

    k_cache and v_cache [num_blocks, block_size, n_kv, D] (one layer), block_tables [B, nb], seq_lens [B] (each
    sequence's key count, its last new token's included); with `window`, each token sees its last `window` keys.
    """
    N, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if not supports_prefill(block_size, head_dim):
        raise ValueError(f"block_size {block_size}, head_dim {head_dim}: the Triton prefill kernel needs a power-of-two "
                         "block of at least 16 and heads of at most 256")
    B = block_tables.shape[0]
    if N != B * num_tokens:
        raise ValueError(f"q has {N} rows, {B} sequences of {num_tokens} tokens need {B * num_tokens}")
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_m = max(1, PREFILL_ROWS // block_g)
    q = q.contiguous()
    out = torch.empty_like(q)
    launch(PREFILL, lambda: _paged_prefill_kernel[(B, num_kv_heads, triton.cdiv(num_tokens, block_m))](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        head_dim**-0.5, window or 0, head_dim, num_tokens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, BLOCK_M=block_m, BLOCK_S=block_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), WINDOWED=window is not None, UPCAST=INTERPRETED,
        PRECISION=dot_precision(q.dtype),
    ))
    return out
