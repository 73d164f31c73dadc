"""One line saying which backend each operation of a loaded model runs on, and why (logged at worker start).

    experts: NativeExperts; attention: NativeAttention; linear: NativeLinear x12, OneDNNLinear x2; ...
        (cpu float32: native kernels built)

or, on an image without a C compiler,

    experts: OneDNNExperts; attention: TorchAttention; ... (cpu float32: native kernels unavailable, fallback:
        no C compiler found (set CC, or install gcc))

so that an operator sees a slow fallback at once instead of guessing from the decode speed.
"""

from __future__ import annotations

from collections import Counter

import torch

from moemesh.worker.ops import native

# The operations a model's modules run, in the order the line lists them (module class name -> operation).
_OPERATIONS = {"MoEExperts": "experts", "Attention": "attention", "Linear": "linear", "QKVLinear": "linear",
               "GateUpLinear": "linear", "TopKRouter": "router", "RMSNorm": "norm"}


def backend_choices(model: torch.nn.Module) -> dict[str, Counter]:
    """Operation -> how many modules run on each backend class (by name), for the modules that chose one."""
    found: dict[str, Counter] = {}
    for module in model.modules():
        backend = getattr(module, "backend", None)
        operation = _OPERATIONS.get(type(module).__name__)
        if operation is None or backend is None or type(backend).__name__ == "NotChosen":
            continue
        found.setdefault(operation, Counter())[type(backend).__name__] += 1
    order = list(dict.fromkeys(_OPERATIONS.values()))
    return {op: found[op] for op in sorted(found, key=order.index)}


def native_kernels_state(device: torch.device, dtype: torch.dtype) -> str:
    """Why the native CPU kernels do or do not serve `device` and `dtype`."""
    if device.type != "cpu":
        return f"{device.type} {_dtype_name(dtype)}: native CPU kernels not used on this device"
    if dtype != torch.float32:
        return f"cpu {_dtype_name(dtype)}: native CPU kernels serve float32 only"
    kernels = native.load_kernels()
    if kernels.available:
        return "cpu float32: native kernels built"
    return f"cpu float32: native kernels unavailable, fallback: {kernels.reason}"


def describe_backends(model: torch.nn.Module) -> str:
    """`experts: NativeExperts; attention: ...; ... (cpu float32: native kernels built)`."""
    weight = next((p for p in model.parameters() if p.device.type != "meta"), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None else torch.float32
    parts = []
    for operation, counts in backend_choices(model).items():
        names = ", ".join(name if len(counts) == 1 else f"{name} x{n}" for name, n in counts.most_common())
        parts.append(f"{operation}: {names}")
    return f"{'; '.join(parts) or 'no operations'} ({native_kernels_state(device, dtype)})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
