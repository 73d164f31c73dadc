"""Tensors across process boundaries: raw bytes with a dtype and shape header."""

from __future__ import annotations

import math
import warnings

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
_NAME_BY_NUMPY = {np.dtype(name): name for name in ("float32", "float16", "int32", "int64")}
_NUMPY_BY_NAME = {name: dtype for dtype, name in _NAME_BY_NUMPY.items()}

# `from_pb(copy=False)` views a message's immutable bytes, documented read-only; torch warns about such a view (once).
# Filtered once here: a `warnings.catch_warnings()` per call would cost more than the decode and, changing the
# process-wide filters, is not safe while other threads decode.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def to_pb(tensor: torch.Tensor | np.ndarray) -> common_pb2.Tensor:
    """Encode a tensor (any device), or a host array, as a Tensor message."""
    message = common_pb2.Tensor()
    fill_pb(message, tensor)
    return message


def fill_pb(message: common_pb2.Tensor, tensor: torch.Tensor | np.ndarray) -> None:
    """Encode a tensor, or a host array, into `message`, an empty Tensor field of a message being built: the bytes
    are copied once, where `field=to_pb(...)` in a constructor copies them again."""
    if isinstance(tensor, np.ndarray):
        name = _NAME_BY_NUMPY.get(tensor.dtype)
        if name is None:
            raise ValueError(f"array dtype {tensor.dtype} cannot be encoded")
        raw = tensor
    else:
        name = _NAME_BY_TORCH.get(tensor.dtype)
        if name is None:
            raise ValueError(f"tensor dtype {tensor.dtype} cannot be encoded")
        cpu = tensor.detach().contiguous().cpu()
        raw = (cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu).numpy()
    message.dtype = name
    message.shape.extend(raw.shape)
    message.data = raw.tobytes()


def from_pb(message: common_pb2.Tensor, copy: bool = True) -> torch.Tensor:
    """Decode a Tensor message into a CPU tensor: a copy that owns its memory, or (`copy=False`) a read-only view
    of the message's bytes, which must then be neither written nor outlive the message."""
    dtype = _TORCH_BY_NAME.get(message.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {message.dtype!r} is not one of {sorted(_TORCH_BY_NAME)}")
    shape, data = _shape_and_data(message, dtype.itemsize)
    if not data:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses an empty buffer
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    # With `copy` the tensor owns a writable copy; without, it views `data`, read only (its warning is
    # filtered above), which it keeps alive.
    flat = torch.frombuffer(bytearray(data) if copy else data, dtype=raw_dtype)
    return flat.view(dtype).reshape(shape)


def array_from_pb(message: common_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor message into a read-only host array viewing the message's bytes (bfloat16, which numpy
    lacks, into a float32 copy): for small index and weight tensors, where a torch view costs several calls."""
    dtype = _NUMPY_BY_NAME.get(message.dtype)
    if dtype is None:
        return from_pb(message).float().numpy() if message.dtype == "bfloat16" else from_pb(message).numpy()
    shape, data = _shape_and_data(message, dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _shape_and_data(message: common_pb2.Tensor, itemsize: int) -> tuple[tuple[int, ...], bytes]:
    """The message's shape and bytes; ValueError unless the bytes are exactly the shape's."""
    shape = tuple(message.shape)
    data = message.data  # each read of a bytes field makes a new copy of it: one read
    if len(data) != math.prod(shape) * itemsize:
        raise ValueError(f"tensor data has {len(data)} bytes, shape {shape} needs {itemsize} each")
    return shape, data
