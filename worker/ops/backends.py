"""How an operation picks its backend: once, at load, from what the device, dtype and build support.

Each operation module (`linear`, `experts`, `attention`, `norm`, `router`)
declares a table of backend classes in order of preference, and its `choose_*`
function builds the first one whose `serves(target)` is true. The model stores
the built backend on its module and calls it directly from then on: a forward
pays for no choice at all. Inside a backend, a size check (the native panels
serve small batches and hand larger ones on) is that backend's own policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from moemesh.worker.ops import native
from moemesh.worker.ops.packing import packing_available


@dataclass(frozen=True)
class Target:
    """What a backend choice depends on: the model's device and dtype, and whether weights may be laid out anew."""

    device: torch.device
    dtype: torch.dtype
    # True: weights take the layout of the kernel that reads them (native panels, oneDNN's blocks) and the plain
    # copy may be released; False: every backend reads the checkpoint layout.
    relayout: bool = True

    @classmethod
    def of(cls, tensor: torch.Tensor, relayout: bool = True) -> Target:
        """The target of a model whose weights are like `tensor`."""
        return cls(tensor.device, tensor.dtype, relayout)

    @property
    def native(self) -> bool:
        """Whether the native CPU kernels serve this target: float32 on the CPU, with the library built."""
        return native.kernels_supported(self.device, self.dtype)

    @property
    def onednn(self) -> bool:
        """Whether weights may be packed for oneDNN here: re-layout allowed, and a CPU and dtype oneDNN packs."""
        return self.relayout and packing_available(self.device, self.dtype)


class Backend(ABC):
    """One implementation of an operation; `serves` says which targets it can run on.

    `graph_safe`: a decode step (one new token per sequence) on it keeps every size and decision on the
    device (no host sync, no shape read back), so the step can be captured in a CUDA graph and replayed.
    """

    graph_safe = False

    @classmethod
    @abstractmethod
    def serves(cls, target: Target) -> bool:
        """Whether this backend can run the operation for `target`."""


B = TypeVar("B", bound=type[Backend])


def first_serving(table: Sequence[B], target: Target, after: type[Backend] | None = None) -> B:
    """The first backend class of `table` (of those listed after `after`, when given) that serves `target`."""
    start = table.index(after) + 1 if after is not None else 0
    for backend in table[start:]:
        if backend.serves(target):
            return backend
    raise ValueError(f"no backend of {[b.__name__ for b in table[start:]]} serves {target}")


class NotChosen:
    """A module's backend before the model chose its backends at load: any use says so, rather than fail obscurely."""

    message = "no backend chosen yet: build the model with build_model, or call choose_backends() after loading weights"

    def __call__(self, *args, **kwargs):
        raise RuntimeError(self.message)

    def __getattr__(self, name: str):
        raise AttributeError(f"{name}: {self.message}")


NOT_CHOSEN = NotChosen()
