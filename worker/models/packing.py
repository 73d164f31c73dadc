"""Weights pre-packed for oneDNN on CPU: the matmuls of a decode step stream them far faster.

A decode step multiplies a few token rows by every weight matrix. PyTorch's
default CPU matmul re-lays the weight out for its kernel on every call, so at
a handful of rows it moves each weight two or three times. oneDNN can lay a
weight out once, at load time, in the blocked format its kernel reads; the
matmul then streams it once. On the 2-core bench machine an expert's SwiGLU
runs about 1.5x faster than the batched `bmm` and 2x faster than `F.linear`
at 8 rows per expert (see bench/engine_bench.py).

Packed weights are opaque tensors for oneDNN alone; the modules that use them
(`layers.Linear`, `layers.MoEExperts`) keep the plain weight only when
something else shares it (a tied embedding).
"""

from __future__ import annotations

import torch

# Dtypes oneDNN packs on CPU. bfloat16 runs natively on CPUs with AVX512-BF16 or AMX.
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packing_available(weight: torch.Tensor) -> bool:
    """Whether `weight` [out, in] can be packed: a CPU tensor of a packable dtype with oneDNN built in."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKABLE_DTYPES
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] laid out once for oneDNN's matmul kernel (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the packed weight: x [..., in] -> [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)
