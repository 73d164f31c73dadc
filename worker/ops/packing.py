"""Weights pre-packed for oneDNN on CPU: the matmuls of a decode step stream them far faster.

A decode step multiplies a few token rows by every weight matrix. PyTorch's
default CPU matmul re-lays the weight out for its kernel on every call, so at
a handful of rows it moves each weight two or three times. oneDNN can lay a
weight out once, at load time, in the blocked format its kernel reads; the
matmul then streams it once. On the 2-core bench machine an expert's SwiGLU
runs about 1.5x faster than the batched `bmm` and 2x faster than `F.linear`
at 8 rows per expert (see bench/engine_bench.py).

Packed weights are opaque tensors for oneDNN alone; the backends that use
them (`linear.OneDNNLinear`, `experts.OneDNNExperts`) let the model release
the plain weight unless something else reads it: a tied embedding, or (for a
projection, float32) the native kernel that serves small batches.
"""

from __future__ import annotations

import platform

import torch


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` on `device` can be packed: the CPU of an x86-64 machine with oneDNN built in,
    float32, or bfloat16 where oneDNN supports it on this CPU (AVX-512 and newer; other CPUs keep the plain weights)."""
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
