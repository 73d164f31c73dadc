"""The gateway's embedding rows and cache entries, decoded with numpy (the gateway imports no torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moemesh.cache.embeddings import entry_size, pack_embedding, unpack_embedding
from moemesh.gateway.embedding import _float_rows
from moemesh.services.core import tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_worker_rows_in_any_wire_dtype_decode_to_float32_as_torch_reads_them(dtype):
    sent = torch.randn(3, 8).to(dtype)
    rows = _float_rows(tensors.to_pb(sent), 3)
    assert rows.dtype == np.float32 and rows.shape == (3, 8)
    assert rows.tolist() == sent.float().tolist(), "exactly the values the worker sent"


@pytest.mark.parametrize("tamper", ["rows", "bytes", "dtype", "rank"])
def test_an_answer_that_is_not_rows_of_floats_is_refused(tamper):
    message = tensors.to_pb(torch.randn(3, 8))
    if tamper == "rows":
        message.shape[0] = 2
    elif tamper == "bytes":
        message.data = message.data[:-4]
    elif tamper == "dtype":
        message.dtype = "int32"
    else:
        message.shape[:] = [24]
    with pytest.raises(ValueError, match="the worker answered 3 inputs"):
        _float_rows(message, 3)


def test_a_cache_entry_round_trips_the_vector_and_count():
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    raw = pack_embedding(vector, 17)
    assert len(raw) == entry_size(384)
    back, count = unpack_embedding(raw)
    assert count == 17 and back.dtype == np.float32 and np.array_equal(back, vector)
    assert pack_embedding(vector.astype(np.float64), 17) == raw, "stored as float32 whatever it came as"


def test_the_torch_free_row_sizes_are_those_of_the_wire_format():
    from moemesh.services.core.tensor_rows import ITEMSIZE

    for name, size in ITEMSIZE.items():
        assert tensors.from_pb(tensors.to_pb(torch.zeros(1, dtype=getattr(torch, name)))).element_size() == size
