"""Attention over the paged KV cache, on the backend chosen once at load.

Two calls per layer: `rotate_and_store` applies the rotary embedding to q
and k and writes the new keys and values to their cache slots;
`attend` runs one attention group's queries against its cached keys.
`choose_attention` builds the first entry of `ATTENTION_BACKENDS` that
serves the target:
  - `NativeAttention` (float32 on the CPU, with the native kernels): rotary
    and the cache write in one call; decode groups read each sequence's
    blocks in place; prefill groups as `TorchAttention`;
  - `TritonAttention` (CUDA, with Triton, unless MOEMESH_TRITON_KERNELS=0):
    rotary and the cache write in one launch (`ops/gpu/layer_ops.py`); decode
    and prefill groups read the paged cache in place (`ops/gpu/attention.py`);
  - `TorchAttention` (any device; the reference): `apply_rotary` and
    `PagedKVCache.write`; keys gathered from the cache, then SDPA with the
    group's mask.
"""

from __future__ import annotations

from abc import abstractmethod
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Backend, Target, first_serving
from moemesh.worker.ops.gpu import attempt, triton_kernels

if TYPE_CHECKING:
    from moemesh.worker.engine.kv_cache import PagedKVCache
    from moemesh.worker.models.batch import AttentionGroup


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by cos, sin [N, D] ("rotate_half" layout)."""
    cos = cos.to(x.dtype)[:, None]  # [N, 1, D]
    sin = sin.to(x.dtype)[:, None]
    return x * cos + rotate_half(x) * sin


class AttentionBackend(Backend):
    """Grouped-query attention of `num_heads` query heads over `num_kv_heads` cached heads of size `head_dim`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, target: Target) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    @abstractmethod
    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, cache: PagedKVCache, layer: int) -> torch.Tensor:
        """Rotate q [N, nh, D] and k [N, n_kv, D] by cos, sin [N, D], store k and v at `slots` [N]; the rotated q."""

    @abstractmethod
    def attend(
        self, q: torch.Tensor, group: AttentionGroup, cache: PagedKVCache, layer: int, window: int | None
    ) -> torch.Tensor:
        """One group's queries q [B*T, nh, D] against their cached keys (the last `window`, when set) -> [B*T, nh*D]."""


class TorchAttention(AttentionBackend):
    """Rotary and the cache write as PyTorch operators, then gathered keys and SDPA: any device; the reference."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, target: Target) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, target)
        # PyTorch's CPU attention kernel is several times slower in 16-bit floats than in float32
        # (measured: bf16 2.4 ms vs fp32 0.4 ms for a 32-sequence decode); the casts cost far less.
        self.upcast = target.device.type == "cpu" and target.dtype != torch.float32

    @classmethod
    def serves(cls, target: Target) -> bool:
        return True

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, cache: PagedKVCache, layer: int) -> torch.Tensor:
        q = apply_rotary(q, cos, sin)
        cache.write(layer, slots, apply_rotary(k, cos, sin), v)
        return q

    def attend(
        self, q: torch.Tensor, group: AttentionGroup, cache: PagedKVCache, layer: int, window: int | None
    ) -> torch.Tensor:
        B, T = group.num_seqs, group.num_tokens
        keys, values = cache.gather(layer, group.block_tables)  # [B, nb*bs, n_kv, D]
        queries = q.view(B, T, self.num_heads, self.head_dim)
        keys, values = keys[:, : group.kv_len], values[:, : group.kv_len]
        if self.upcast:
            queries, keys, values = queries.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),  # [B, nh, T, D]
            keys.transpose(1, 2),  # [B, n_kv, L, D]
            values.transpose(1, 2),
            attn_mask=group.masks[window],
            enable_gqa=True,
        )  # [B, nh, T, D]
        return out.transpose(1, 2).reshape(B * T, self.num_heads * self.head_dim).to(q.dtype)


class NativeAttention(TorchAttention):
    """Rotary with the cache write in one native call, and decode attention reading the paged cache in place.

    PyTorch gathers each sequence's blocks into a dense copy first, which
    moves the cache three times per decode step; the kernel reads the blocks
    where they are. Prefill groups (T > 1) take the gathered path.
    """

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.native

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, cache: PagedKVCache, layer: int) -> torch.Tensor:
        # One pass: rotate q and k, store k and v in their cache slots (what `PagedKVCache.write` does).
        return native.rotary_store(q, k, v, cos, sin, slots, cache.k[layer], cache.v[layer])

    def attend(
        self, q: torch.Tensor, group: AttentionGroup, cache: PagedKVCache, layer: int, window: int | None
    ) -> torch.Tensor:
        if group.num_tokens > 1:
            return super().attend(q, group, cache, layer, window)
        out = native.paged_decode_attention(q, cache.k[layer], cache.v[layer], group.block_tables, group.seq_lens, window)
        return out.view(group.num_seqs, self.num_heads * self.head_dim)


class TritonAttention(TorchAttention):
    """Attention reading the paged cache in place (`ops/gpu/attention.py`); CUDA, with Triton.

    Rotary and the cache write are one launch (`ops/gpu/layer_ops.py`). Decode groups (T = 1) take the decode
    kernel, prefill groups (T > 1) the chunked-prefill kernel, causal over each sequence's cached prefix and its
    new tokens. Attention is PyTorch's, as in `TorchAttention`, over caches whose block size a kernel cannot walk
    (decode: not a power of two; prefill: also under 16) or heads over 256; and PyTorch serves each of these
    steps once its kernel failed to build or fit the device. A decode step reads its sequence lengths and block
    tables on the device: it can be captured in a CUDA graph.
    """

    graph_safe = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, target: Target,
                 kernels: ModuleType | None = None, layer_ops: ModuleType | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, target)
        if kernels is None:  # imported here: they need Triton
            from moemesh.worker.ops.gpu import attention as kernels
        if layer_ops is None:
            from moemesh.worker.ops.gpu import layer_ops
        self.kernels, self.layer_ops = kernels, layer_ops

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.device.type == "cuda" and triton_kernels()

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         slots: torch.Tensor, cache: PagedKVCache, layer: int) -> torch.Tensor:
        ops, rotated = self.layer_ops, None
        if ops.supports_rotary(self.head_dim):  # one launch: rotate q and k, store k and v in their cache slots
            rotated = attempt(ops.ROTARY, lambda: ops.rotary_store(q, k, v, cos, sin, slots, cache.k[layer],
                                                                   cache.v[layer]))
        return super().rotate_and_store(q, k, v, cos, sin, slots, cache, layer) if rotated is None else rotated

    def attend(
        self, q: torch.Tensor, group: AttentionGroup, cache: PagedKVCache, layer: int, window: int | None
    ) -> torch.Tensor:
        kernels, keys, values, out = self.kernels, cache.k[layer], cache.v[layer], None
        if group.num_tokens > 1:
            if kernels.supports_prefill(cache.block_size, self.head_dim):
                out = attempt(kernels.PREFILL, lambda: kernels.paged_prefill_attention(
                    q, keys, values, group.block_tables, group.seq_lens, group.num_tokens, window))
        elif kernels.supported_block_size(cache.block_size):
            out = attempt(kernels.DECODE, lambda: kernels.paged_decode_attention(
                q, keys, values, group.block_tables, group.seq_lens, window))
        if out is None:
            return super().attend(q, group, cache, layer, window)
        return out.view(group.num_seqs * group.num_tokens, self.num_heads * self.head_dim)


# In order of preference: `choose_attention` builds the first entry that serves the target.
ATTENTION_BACKENDS: tuple[type[AttentionBackend], ...] = (NativeAttention, TritonAttention, TorchAttention)


def choose_attention(num_heads: int, num_kv_heads: int, head_dim: int, target: Target) -> AttentionBackend:
    """The attention backend for `target`: the first of `ATTENTION_BACKENDS` that serves it."""
    return first_serving(ATTENTION_BACKENDS, target)(num_heads, num_kv_heads, head_dim, target)
