"""Tensors across process boundaries: raw bytes with a dtype and shape header."""

from __future__ import annotations

import numpy as np
import torch

from moemesh.v1 import common_pb2

# bfloat16 has no numpy dtype: it travels as its raw 16-bit pattern.
_TORCH_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAME_BY_TORCH = {v: k for k, v in _TORCH_BY_NAME.items()}


def to_pb(tensor: torch.Tensor) -> common_pb2.Tensor:
    """Encode a tensor (any device) as a Tensor message."""
    name = _NAME_BY_TORCH.get(tensor.dtype)
    if name is None:
        raise ValueError(f"tensor dtype {tensor.dtype} cannot be encoded")
    cpu = tensor.detach().contiguous().cpu()
    raw = cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu
    return common_pb2.Tensor(dtype=name, shape=list(cpu.shape), data=raw.numpy().tobytes())


def from_pb(message: common_pb2.Tensor) -> torch.Tensor:
    """Decode a Tensor message into a CPU tensor (a copy that owns its memory)."""
    dtype = _TORCH_BY_NAME.get(message.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {message.dtype!r} is not one of {sorted(_TORCH_BY_NAME)}")
    shape = tuple(message.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != int(np.prod(shape, dtype=np.int64)) * itemsize:
        raise ValueError(f"tensor data has {len(message.data)} bytes, shape {shape} needs {itemsize} each")
    if dtype == torch.bfloat16:
        flat = torch.frombuffer(bytearray(message.data), dtype=torch.int16).view(torch.bfloat16)
    else:
        flat = torch.frombuffer(bytearray(message.data), dtype=dtype)
    return flat.reshape(shape)
