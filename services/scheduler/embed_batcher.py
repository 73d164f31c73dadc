"""Batches embedding requests from many callers into one worker call.

Requests for the same model (and normalisation) that arrive within
`max_delay` of each other are concatenated into one `EmbedWork`, up to
`max_inputs` texts, so the worker runs one forward pass for all of them; the
result rows are split back to each caller in order. If a merged call fails,
each request is retried on its own, so one caller's bad input never fails
another caller's request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from moemesh.services.core.tensor_rows import row_bytes
from moemesh.services.core.tracing import current_span_context, span
from moemesh.v1 import common_pb2, worker_pb2

EmbedCall = Callable[[worker_pb2.EmbedWork], Awaitable[worker_pb2.EmbedResult]]


@dataclass
class _Batch:
    requests: list[tuple[worker_pb2.EmbedWork, asyncio.Future]] = field(default_factory=list)
    spans: list[object] = field(default_factory=list)  # each request's span context (tracing on), to link to
    inputs: int = 0
    timer: asyncio.TimerHandle | None = None


class EmbedBatcher:
    """Collects concurrent Embed requests per (model, normalize) and sends them as one."""

    def __init__(self, call: EmbedCall, max_inputs: int = 256, max_delay: float = 0.002) -> None:
        self.call = call
        self.max_inputs = max_inputs
        self.max_delay = max_delay
        self._open: dict[tuple[str, bool], _Batch] = {}
        self.calls = 0  # worker calls made (for tests and metrics)
        self.requests = 0

    async def embed(self, request: worker_pb2.EmbedWork) -> worker_pb2.EmbedResult:
        """The result for `request` alone, computed together with whatever else arrives meanwhile."""
        self.requests += 1
        if len(request.inputs) >= self.max_inputs:
            self.calls += 1
            return await self.call(request)
        key = (request.model, request.normalize)
        batch = self._open.get(key)
        if batch is not None and batch.inputs + len(request.inputs) > self.max_inputs:
            self._flush(key)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch()
            batch.timer = asyncio.get_running_loop().call_later(self.max_delay, self._flush, key)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        batch.requests.append((request, future))
        batch.spans.append(current_span_context())
        batch.inputs += len(request.inputs)
        if batch.inputs >= self.max_inputs:
            self._flush(key)
        return await future

    def _flush(self, key: tuple[str, bool]) -> None:
        batch = self._open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        asyncio.get_running_loop().create_task(self._run(key, batch))

    async def _run(self, key: tuple[str, bool], batch: _Batch) -> None:
        if len(batch.requests) == 1:
            await self._single(*batch.requests[0])
            return
        model, normalize = key
        merged = worker_pb2.EmbedWork(model=model, normalize=normalize,
                                      inputs=[text for request, _ in batch.requests for text in request.inputs])
        self.calls += 1
        try:
            # Runs in the context of the request that opened the batch; the span links the others' spans.
            with span("embed batch", {"moemesh.requests": len(batch.requests), "moemesh.inputs": batch.inputs},
                      links=batch.spans):
                result = await self.call(merged)
            width = _row_bytes(result.vectors, batch.inputs)  # [sum inputs, D]
        except Exception:  # a merged failure, or an answer that does not split, is retried request by request
            await asyncio.gather(*(self._single(request, future) for request, future in batch.requests))
            return
        start = 0
        for request, future in batch.requests:
            stop = start + len(request.inputs)
            if not future.done():
                rows = common_pb2.Tensor(dtype=result.vectors.dtype, shape=[stop - start, *result.vectors.shape[1:]],
                                         data=result.vectors.data[start * width:stop * width])
                future.set_result(worker_pb2.EmbedResult(vectors=rows, token_counts=result.token_counts[start:stop]))
            start = stop

    async def _single(self, request: worker_pb2.EmbedWork, future: asyncio.Future) -> None:
        self.calls += 1
        try:
            result = await self.call(request)
        except Exception as exc:  # handed to the caller
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)


def _row_bytes(vectors: common_pb2.Tensor, rows: int) -> int:
    """Bytes per row of the worker's [rows, ...] answer; ValueError if it is not that."""
    width = row_bytes(vectors, rows)
    if width is None:
        raise ValueError(f"the worker answered {rows} inputs with a {vectors.dtype!r} tensor of shape "
                         f"{list(vectors.shape)} and {len(vectors.data)} bytes")
    return width
