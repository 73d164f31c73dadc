"""An MoE router's choice, softmax over the router logits then top-k, on the backend chosen once at load.

`choose_router` builds the first entry of `ROUTER_BACKENDS` that serves the
target:
  - `NativeRouter` (float32 on the CPU, with the native kernels): the
    logits, softmax and top-k in one call;
  - `TorchRouter` (any device; the reference): PyTorch operators, the
    softmax in float32.

A Triton/CUDA backend (a fused gate + top-k kernel) would be one class taking
CUDA targets, listed before `TorchRouter`.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F

from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Backend, Target, first_serving


class RouterBackend(Backend):
    """x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] float32), highest first."""

    def __init__(self, weight: torch.Tensor, top_k: int, renormalize: bool) -> None:
        self.weight = weight  # [E, H]
        self.top_k = top_k
        self.renormalize = renormalize  # rescale each token's top-k weights to sum to 1

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k], topk_weights [T, k])."""


class TorchRouter(RouterBackend):
    """PyTorch operators: any device; the reference."""

    graph_safe = True

    @classmethod
    def serves(cls, target: Target) -> bool:
        return True

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).float().softmax(dim=-1)  # [T, E]
        topk_weights, topk_ids = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_ids, topk_weights


class NativeRouter(RouterBackend):
    """The native kernel (float32 CPU): logits, softmax and top-k in one call."""

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.native

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return native.route(x, self.weight, self.top_k, self.renormalize)


# In order of preference: `choose_router` builds the first entry that serves the target.
ROUTER_BACKENDS: tuple[type[RouterBackend], ...] = (NativeRouter, TorchRouter)


def choose_router(weight: torch.Tensor, top_k: int, renormalize: bool, target: Target) -> RouterBackend:
    """The router's backend for `target`: the first of `ROUTER_BACKENDS` that serves it."""
    return first_serving(ROUTER_BACKENDS, target)(weight, top_k, renormalize)
