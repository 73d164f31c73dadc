"""Dense projections, y = x W^T + b, on the backend chosen once per weight at load.

`choose_linear` builds the first entry of `LINEAR_BACKENDS` that serves the
target:
  - `NativeLinear` (float32 on the CPU, with the native kernels): small
    batches (single-stream and decode steps) in the native kernel, on panels
    of 32 output columns where the output size allows (and re-layout is on),
    else on the plain weight; larger batches (prefill) go to the next entry;
  - `OneDNNLinear` (CPU, with re-layout): oneDNN's packed copy (`packing`);
  - `TorchLinear` (any device, CUDA included): `F.linear`, the reference.

A Triton/CUDA projection (a quantized or fused GEMM, say) would be one class
whose `serves` accepts CUDA targets, listed before `TorchLinear`.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F

from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Backend, Target, first_serving
from moemesh.worker.ops.packing import pack_weight, packed_linear

# Most token rows a dense projection sends to the native kernel (float32 CPU); more go to the next backend
# (oneDNN). Over the bench checkpoint's projections (8 layers of q/k/v and o, and the head) on the 2-core bench
# machine (bench/native_bench.py --rows N), the kernel on the panel layout measured 1.7x faster than
# oneDNN-packed weights at 8 rows, 1.17x at 32, 1.08x at 64 and even at 128; on the plain layout (for output
# sizes the panels cannot hold) 1.14x at 32 rows and 0.96x at 48 and 64.
NATIVE_PANEL_ROWS = 64
NATIVE_LINEAR_ROWS = 32


class LinearBackend(Backend):
    """x [..., in] -> x W^T + b [..., out], on the weight as this backend laid it out."""

    panels: torch.Tensor | None = None  # the native kernel's panel layout, when this backend holds it
    packed: torch.Tensor | None = None  # oneDNN's packed copy, when this backend holds it
    reads_plain_weight = True  # False: nothing here reads the plain weight, so its module may release it
    relaid = False  # the weight was laid out anew for this backend

    @classmethod
    @abstractmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, target: Target) -> LinearBackend:
        """This backend on `weight` [out, in] and `bias` [out] (or None)."""

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""


class TorchLinear(LinearBackend):
    """`F.linear` on the plain weight: any device and dtype; the reference."""

    graph_safe = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    @classmethod
    def serves(cls, target: Target) -> bool:
        return True

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, target: Target) -> TorchLinear:
        return cls(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class OneDNNLinear(LinearBackend):
    """The weight packed once for oneDNN's matmul (CPU): a decode step streams it once, not two or three times."""

    reads_plain_weight = False
    relaid = True

    def __init__(self, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> None:
        self.packed, self.out_features, self.bias = packed, out_features, bias

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.onednn

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, target: Target) -> OneDNNLinear:
        return cls(pack_weight(weight), weight.shape[0], bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.out_features, self.bias)


class NativeLinear(LinearBackend):
    """The native kernel for batches of up to `max_rows` rows (float32 CPU); `larger` for the rest.

    The kernel reads panels of 32 output columns (`native.pack_linear`) or,
    for output sizes the panels cannot hold, the plain weight.
    """

    def __init__(self, weight: torch.Tensor, max_rows: int, bias: torch.Tensor | None, larger: LinearBackend) -> None:
        self.weight, self.bias, self.larger = weight, bias, larger  # weight: [out/32, in, 32] panels or [out, in]
        on_panels = weight.dim() == 3
        self.max_elements = max_rows * weight.shape[1]  # of x: `max_rows` rows of `in` features (dim 1 of both layouts)
        self.panels = weight if on_panels else None
        self.packed = larger.packed
        self.reads_plain_weight = not on_panels or larger.reads_plain_weight
        self.relaid = on_panels or larger.relaid

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.native

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, target: Target) -> NativeLinear:
        larger = choose_linear(weight, bias, target, after=cls)
        if target.relayout and weight.shape[0] % 32 == 0:
            return cls(native.pack_linear(weight.detach()), NATIVE_PANEL_ROWS, bias, larger)
        return cls(weight, NATIVE_LINEAR_ROWS, bias, larger)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.max_elements:
            return native.linear(x, self.weight, self.bias)
        return self.larger(x)


# In order of preference: `choose_linear` builds the first entry that serves the target.
LINEAR_BACKENDS: tuple[type[LinearBackend], ...] = (NativeLinear, OneDNNLinear, TorchLinear)


def choose_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, target: Target, after: type[LinearBackend] | None = None
) -> LinearBackend:
    """The projection's backend for `target`: the first of `LINEAR_BACKENDS` (past `after`) that serves it."""
    return first_serving(LINEAR_BACKENDS, target, after).build(weight, bias, target)
