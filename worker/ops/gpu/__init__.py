"""GPU kernels (Triton) behind the ops layer's CUDA backends; their logic is tested on the CPU under the Triton interpreter.

`moe.py`: the fused MoE layer (expert-sorted tokens, one grouped GEMM launch
for gate+up with SwiGLU, one for down with the routing weights).
`attention.py`: decode and chunked-prefill attention reading the paged KV cache in place.
`layer_ops.py`: RMSNorm with the residual add, and rotary with the KV cache write, one launch each.
These modules import Triton; the backends import them only when a CUDA
model is built, and `triton_kernels` says whether they may.

Every kernel launches through `launch`: one that fails to compile or to fit
the device (none has yet run on a GPU of every kind) is logged once, marked
unavailable for the process, and its backend, which calls it through
`attempt`, takes the PyTorch path, so that a first run on a new device
serves, and reports, rather than fails.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

SWITCH = "MOEMESH_TRITON_KERNELS"  # "0" turns the Triton backends off (the PyTorch path serves CUDA alone)


def triton_kernels() -> bool:
    """Whether the Triton backends may serve CUDA targets: Triton is installed and not switched off."""
    return os.environ.get(SWITCH, "1") != "0" and importlib.util.find_spec("triton") is not None


class KernelUnavailable(RuntimeError):
    """A Triton kernel does not build or fit this device: its backend takes the PyTorch path."""


# Kernel name -> why it cannot run in this process, once one of its launches failed to compile or fit the device.
_failures: dict[str, str] = {}


def unavailable(kernel: str) -> str | None:
    """Why `kernel` cannot run here (None: it can, as far as its launches have shown)."""
    return _failures.get(kernel)


def failures() -> dict[str, str]:
    """Every kernel that could not run in this process, and why (for reports)."""
    return dict(_failures)


def launch(kernel: str, run: Callable[[], None]) -> None:
    """Run `kernel`'s launches; if they fail to compile or to fit the device, mark it unavailable here, log it once
    and raise KernelUnavailable (the caller falls back). Other errors pass through, the interpreter's included (a
    kernel's bug must fail its tests, not fall back)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    try:
        run()
    except (CompilationError, OutOfResources, PTXASError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "PassManager" not in str(exc):
            raise  # a lowering pass that failed reports "PassManager::run failed"; anything else is not a build error
        _failures[kernel] = f"{type(exc).__name__}: {exc}"
        log.warning("the Triton %s kernel cannot run on this device; PyTorch serves it from here on: %s", kernel,
                    _failures[kernel])
        raise KernelUnavailable(_failures[kernel]) from exc


def attempt(kernel: str, call: Callable[[], T]) -> T | None:
    """`call()`, which launches `kernel`; None when the kernel cannot run here (its build failed, now or before):
    the backend then takes the PyTorch path."""
    if kernel in _failures:
        return None
    try:
        return call()
    except KernelUnavailable:
        return None
