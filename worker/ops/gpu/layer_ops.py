"""A decoder layer's small operations fused, one Triton launch each: RMSNorm with the residual add before it, and
rotary with the cache write of the new keys and values.

PyTorch runs the norm as six to eight kernels (casts, square, mean, rsqrt,
products, the add) and rotary with the write as about a dozen (each half
rotated and concatenated, for q and for k, then two index copies); each reads
and writes its tensor again. Here each row is read once and written once.
The arithmetic follows the PyTorch backends': the residual sum rounded to the
model's dtype before it is normed, the norm computed in float32 and rounded
before the weight multiplies it; rotary computed in float32 and rounded once
(PyTorch rounds after each product, so 16-bit results can differ from its by
a unit in the last place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moemesh.worker.ops.gpu import launch

RMS_NORM, ROTARY = "rms_norm", "rotary with the cache write"  # the kernels' names in failure reports


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, dim, eps, stride_x, stride_r, stride_o, stride_s,
    BLOCK_D: tl.constexpr, ADD: tl.constexpr,
):
    """One row: (norm(x + residual), x + residual) with ADD, else norm(x)."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = d < dim
    x = tl.load(x_ptr + row * stride_x + d, mask=ok, other=0.0)
    if ADD:
        residual = tl.load(residual_ptr + row * stride_r + d, mask=ok, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded as PyTorch's add
        tl.store(summed_ptr + row * stride_s + d, x, mask=ok)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / dim + eps)
    normed = (x32 * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + d, (weight * normed).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as contiguous rows [R, D]."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * x / rms(x) over the last dim, x [..., D]; with `residual`, (norm(x + residual), x + residual)."""
    shape, dim = x.shape, x.shape[-1]
    rows = _rows(x)
    out = torch.empty_like(rows)
    summed = torch.empty_like(rows) if residual is not None else out
    res = _rows(residual) if residual is not None else rows
    if rows.shape[0]:
        launch(RMS_NORM, lambda: _rms_norm_kernel[(rows.shape[0],)](
            rows, res, weight, out, summed, dim, eps, rows.stride(0), res.stride(0), out.stride(0), summed.stride(0),
            BLOCK_D=triton.next_power_of_2(dim), ADD=residual is not None,
        ))
    if residual is None:
        return out.view(shape)
    return out.view(shape), summed.view(shape)


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    q_heads, kv_heads, head_dim,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cn, stride_on, stride_oh,
    stride_slot, stride_ch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token n: its query heads rotated into q_out; its key heads rotated, and its value heads, stored at its slot."""
    n = tl.program_id(0).to(tl.int64)
    half = head_dim // 2
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    partner = tl.where(d < half, d + half, d - half)  # rotate_half: (x1, x2) -> (-x2, x1)
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + n * stride_cn + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + n * stride_cn + d, mask=d_ok, other=0.0).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    q_ok = (h < q_heads)[:, None] & d_ok[None, :]
    q_at = q_ptr + n * stride_qn + h[:, None] * stride_qh
    q = tl.load(q_at + d[None, :], mask=q_ok, other=0.0).to(tl.float32)
    q_partner = tl.load(q_at + partner[None, :], mask=q_ok, other=0.0).to(tl.float32)
    q_rot = q * cos[None, :] + sign[None, :] * q_partner * sin[None, :]
    tl.store(q_out_ptr + n * stride_on + h[:, None] * stride_oh + d[None, :], q_rot.to(q_out_ptr.dtype.element_ty),
             mask=q_ok)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    kv_ok = (h < kv_heads)[:, None] & d_ok[None, :]
    k_at = k_ptr + n * stride_kn + h[:, None] * stride_kh
    k = tl.load(k_at + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
    k_partner = tl.load(k_at + partner[None, :], mask=kv_ok, other=0.0).to(tl.float32)
    k_rot = k * cos[None, :] + sign[None, :] * k_partner * sin[None, :]
    cache_at = slot * stride_slot + h[:, None] * stride_ch + d[None, :]
    tl.store(k_cache_ptr + cache_at, k_rot.to(k_cache_ptr.dtype.element_ty), mask=kv_ok)
    v = tl.load(v_ptr + n * stride_vn + h[:, None] * stride_vh + d[None, :], mask=kv_ok, other=0.0)
    tl.store(v_cache_ptr + cache_at, v.to(v_cache_ptr.dtype.element_ty), mask=kv_ok)


def supports_rotary(head_dim: int) -> bool:
    """Rotary pairs the two halves of a head: an even head size."""
    return head_dim > 0 and head_dim % 2 == 0


def rotary_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate q [N, nh, D] and k [N, n_kv, D] by cos, sin [N, D] ("rotate_half" layout), store the rotated keys and
    v [N, n_kv, D] at `slots` [N] (flat block * block_size + offset) of k_cache, v_cache [blocks, block_size,
    n_kv, D]; returns the rotated q."""
    N, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if not supports_rotary(head_dim):
        raise ValueError(f"head_dim {head_dim}: rotary needs an even head size")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if N:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        flat = k_cache.view(-1, kv_heads, head_dim)
        launch(ROTARY, lambda: _rotary_store_kernel[(N,)](
            q, k, v, cos, sin, slots, q_out, k_cache, v_cache,
            q_heads, kv_heads, head_dim,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1), flat.stride(0), flat.stride(1),
            BLOCK_H=triton.next_power_of_2(max(q_heads, kv_heads)), BLOCK_D=triton.next_power_of_2(head_dim),
        ))
    return q_out
