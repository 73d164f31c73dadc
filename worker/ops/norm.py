"""RMSNorm, alone or fused with the residual add before it, on the backend chosen once at load.

`choose_rms_norm` builds the first entry of `RMS_NORM_BACKENDS` that serves
the target:
  - `NativeRMSNorm` (float32 on the CPU, with the native kernels): one call
    instead of several small operators, the residual add included;
  - `TritonRMSNorm` (CUDA, with Triton, unless MOEMESH_TRITON_KERNELS=0):
    one launch per call, the residual add included (`ops/gpu/layer_ops.py`);
  - `TorchRMSNorm` (any device; the reference): computed in float32, as
    transformers does.
"""

from __future__ import annotations

from abc import abstractmethod
from types import ModuleType

import torch

from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Backend, Target, first_serving
from moemesh.worker.ops.gpu import attempt, triton_kernels


class RMSNormBackend(Backend):
    """x [..., D] -> weight * x / rms(x), over the last dim."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight, self.eps = weight, eps  # weight [D]

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """norm(x): [..., D] -> [..., D]."""

    @abstractmethod
    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a decoder layer's residual add and the next norm."""


class TorchRMSNorm(RMSNormBackend):
    """PyTorch operators, in float32 whatever the dtype: any device; the reference."""

    graph_safe = True

    @classmethod
    def serves(cls, target: Target) -> bool:
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        summed = x + residual
        return self(summed), summed


class NativeRMSNorm(RMSNormBackend):
    """The native kernel (float32 CPU): the norm, and the residual add with it, in one pass each."""

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.native

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return native.rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return native.rms_norm(x, self.weight, self.eps, residual)


class TritonRMSNorm(TorchRMSNorm):
    """One Triton launch for the norm, or for the residual add and the norm (`ops/gpu/layer_ops.py`); CUDA.
    `TorchRMSNorm` serves instead once the kernel failed to build or fit the device."""

    graph_safe = True

    def __init__(self, weight: torch.Tensor, eps: float, kernels: ModuleType | None = None) -> None:
        super().__init__(weight, eps)
        if kernels is None:  # imported here: it needs Triton
            from moemesh.worker.ops.gpu import layer_ops as kernels
        self.kernels = kernels

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.device.type == "cuda" and triton_kernels()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = attempt(self.kernels.RMS_NORM, lambda: self.kernels.rms_norm(x, self.weight, self.eps))
        return super().__call__(x) if out is None else out

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = attempt(self.kernels.RMS_NORM, lambda: self.kernels.rms_norm(x, self.weight, self.eps, residual))
        return super().add_norm(x, residual) if out is None else out


# In order of preference: `choose_rms_norm` builds the first entry that serves the target.
RMS_NORM_BACKENDS: tuple[type[RMSNormBackend], ...] = (NativeRMSNorm, TritonRMSNorm, TorchRMSNorm)


def choose_rms_norm(weight: torch.Tensor, eps: float, target: Target) -> RMSNormBackend:
    """The norm's backend for `target`: the first of `RMS_NORM_BACKENDS` that serves it."""
    return first_serving(RMS_NORM_BACKENDS, target)(weight, eps)
