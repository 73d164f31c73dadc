"""Rows of a Tensor message (services.core.tensors' wire format) without decoding it, and without torch.

The scheduler splits a merged embedding answer into each caller's rows, and
the gateway reads those rows with numpy: neither imports torch, which costs
seconds of every start and a quarter GiB resident.
"""

from __future__ import annotations

import math

from moemesh.v1 import common_pb2

# Bytes per element of each dtype a Tensor message may carry.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


def row_bytes(message: common_pb2.Tensor, rows: int) -> int | None:
    """Bytes per row of a [rows, ...] Tensor message of a known dtype whose data fills its shape; None otherwise."""
    itemsize = ITEMSIZE.get(message.dtype)
    if itemsize is None or not message.shape or message.shape[0] != rows \
            or len(message.data) != math.prod(message.shape) * itemsize:
        return None
    return len(message.data) // rows if rows else 0
