"""Embedding requests from many callers share one worker call."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moemesh.services.core import tensors
from moemesh.services.core.errors import InvalidRequest
from moemesh.services.scheduler.embed_batcher import EmbedBatcher
from moemesh.v1 import worker_pb2


class FakeWorker:
    """Embeds text t as [len(t), first char code]; refuses empty inputs like the real worker."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, work: worker_pb2.EmbedWork) -> worker_pb2.EmbedResult:
        self.calls.append(list(work.inputs))
        await asyncio.sleep(0.001)
        if any(not text for text in work.inputs):
            raise InvalidRequest("inputs", "must be non-empty")
        vectors = torch.tensor([[float(len(t)), float(ord(t[0]))] for t in work.inputs])
        return worker_pb2.EmbedResult(vectors=tensors.to_pb(vectors), token_counts=[len(t) for t in work.inputs])


def work(*texts: str, model: str = "m") -> worker_pb2.EmbedWork:
    return worker_pb2.EmbedWork(model=model, inputs=list(texts), normalize=True)


async def test_concurrent_requests_share_one_call_and_get_their_own_rows():
    worker = FakeWorker()
    batcher = EmbedBatcher(worker, max_inputs=64, max_delay=0.01)
    results = await asyncio.gather(batcher.embed(work("a", "bb")), batcher.embed(work("ccc")), batcher.embed(work("dddd")))
    assert len(worker.calls) == 1 and worker.calls[0] == ["a", "bb", "ccc", "dddd"]
    assert tensors.from_pb(results[0].vectors).tolist() == [[1.0, 97.0], [2.0, 98.0]]
    assert tensors.from_pb(results[1].vectors).tolist() == [[3.0, 99.0]]
    assert list(results[2].token_counts) == [4]


async def test_models_are_never_mixed_and_full_batches_go_at_once():
    worker = FakeWorker()
    batcher = EmbedBatcher(worker, max_inputs=3, max_delay=10.0)  # a long delay: only size can flush
    first = asyncio.gather(batcher.embed(work("a", model="x")), batcher.embed(work("b", "c", model="x")))
    other = asyncio.create_task(batcher.embed(work("z", model="y", )))
    await asyncio.wait_for(first, 1.0)  # three inputs fill the batch: sent without waiting for the delay
    assert worker.calls == [["a", "b", "c"]]
    other.cancel()


async def test_one_callers_bad_input_does_not_fail_the_others():
    worker = FakeWorker()
    batcher = EmbedBatcher(worker, max_inputs=64, max_delay=0.01)
    good, bad = await asyncio.gather(batcher.embed(work("fine")), batcher.embed(work("")), return_exceptions=True)
    assert isinstance(bad, InvalidRequest)
    assert tensors.from_pb(good.vectors).tolist() == [[4.0, 102.0]]


async def test_a_request_as_large_as_a_batch_goes_alone():
    worker = FakeWorker()
    batcher = EmbedBatcher(worker, max_inputs=2, max_delay=10.0)
    result = await asyncio.wait_for(batcher.embed(work("a", "b")), 1.0)
    assert worker.calls == [["a", "b"]] and list(result.token_counts) == [1, 1]


@pytest.mark.parametrize("callers", [1, 16])
async def test_every_caller_gets_an_answer(callers):
    worker = FakeWorker()
    batcher = EmbedBatcher(worker, max_inputs=5, max_delay=0.001)
    results = await asyncio.gather(*(batcher.embed(work(chr(97 + i % 26) * (i + 1))) for i in range(callers)))
    assert [list(r.token_counts) for r in results] == [[i + 1] for i in range(callers)]
    assert len(worker.calls) <= max(1, -(-callers // 5)) + 1


async def test_a_merged_answer_that_does_not_split_is_retried_request_by_request():
    class ShortOnMerge(FakeWorker):
        async def __call__(self, work: worker_pb2.EmbedWork) -> worker_pb2.EmbedResult:
            result = await super().__call__(work)
            if len(self.calls) == 1:  # the merged call's answer is one row short: its rows cannot be told apart
                result.vectors.shape[0] -= 1
                result.vectors.data = result.vectors.data[:-8]
            return result

    worker = ShortOnMerge()
    batcher = EmbedBatcher(worker, max_inputs=64, max_delay=0.01)
    first, second = await asyncio.wait_for(asyncio.gather(batcher.embed(work("a", "bb")), batcher.embed(work("ccc"))),
                                           5.0)
    assert worker.calls == [["a", "bb", "ccc"], ["a", "bb"], ["ccc"]], "the merged call, then each alone"
    assert tensors.from_pb(first.vectors).tolist() == [[1.0, 97.0], [2.0, 98.0]]
    assert tensors.from_pb(second.vectors).tolist() == [[3.0, 99.0]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_rows_are_split_as_bytes_in_any_dtype(dtype):
    class InDtype(FakeWorker):
        async def __call__(self, work: worker_pb2.EmbedWork) -> worker_pb2.EmbedResult:
            result = await super().__call__(work)
            result.vectors.CopyFrom(tensors.to_pb(tensors.from_pb(result.vectors).to(getattr(torch, dtype))))
            return result

    batcher = EmbedBatcher(InDtype(), max_inputs=64, max_delay=0.01)
    first, second = await asyncio.gather(batcher.embed(work("a", "bb")), batcher.embed(work("ccc")))
    assert first.vectors.dtype == second.vectors.dtype == dtype
    assert tensors.from_pb(first.vectors).float().tolist() == [[1.0, 97.0], [2.0, 98.0]]
    assert tensors.from_pb(second.vectors).float().tolist() == [[3.0, 99.0]]
