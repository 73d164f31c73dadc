"""GPU kernels (Triton) behind the ops layer's CUDA backends; their logic is tested on the CPU under the Triton interpreter.

`moe.py`: the fused MoE layer (expert-sorted tokens, one grouped GEMM launch
for gate+up with SwiGLU, one for down with the routing weights).
`attention.py`: decode and chunked-prefill attention reading the paged KV cache in place.
`layer_ops.py`: RMSNorm with the residual add, and rotary with the KV cache write, one launch each.
These modules import Triton; the backends import them only when a CUDA
model is built, and `triton_kernels` says whether they may.
"""

from __future__ import annotations

import importlib.util
import os

SWITCH = "MOEMESH_TRITON_KERNELS"  # "0" turns the Triton backends off (the PyTorch path serves CUDA alone)


def triton_kernels() -> bool:
    """Whether the Triton backends may serve CUDA targets: Triton is installed and not switched off."""
    return os.environ.get(SWITCH, "1") != "0" and importlib.util.find_spec("triton") is not None
