"""The gateway's client of the scheduler: one multiplexed Dispatch stream.

Requests from many callers share one stream; the reader task hands each
incoming event to the queue of the request it belongs to. If the stream
breaks (scheduler restarted), pending requests end with UNAVAILABLE
(retryable) and the client reconnects with backoff. Every call presents
the cluster token when one is given (and the gateway's certificate with
mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator

import grpc

from moemesh.services.core.auth import bearer_metadata
from moemesh.services.core.errors import Unavailable, code_name, error_from_code
from moemesh.services.core.tls import aio_channel
from moemesh.services.core.tracing import request_trace
from moemesh.v1 import models_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2

log = logging.getLogger(__name__)

MAX_BACKOFF = 2.0


class SchedulerClient:
    """Submit work, receive its events, cancel it; embeddings and catalogue calls."""

    def __init__(self, address: str, tls_dir: pathlib.Path | None = None, cluster_token: str | None = None) -> None:
        self.address = address
        self.channel = aio_channel(address, tls_dir, "gateway")
        self.metadata = bearer_metadata(cluster_token)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.connected = asyncio.Event()
        self._pending: dict[str, asyncio.Queue[worker_pb2.RequestEvent]] = {}
        self._outbox: asyncio.Queue[worker_pb2.ExecuteRequest] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()

    async def generate(self, work: worker_pb2.GenerationWork) -> AsyncIterator[worker_pb2.RequestEvent]:
        """Events of one request until it finishes; cancels it if the caller stops early."""
        if not self.connected.is_set() or self._outbox is None:
            raise Unavailable("scheduler is not connected")
        if work.request_id in self._pending:
            raise Unavailable(f"request {work.request_id!r} is already running")
        events: asyncio.Queue[worker_pb2.RequestEvent] = asyncio.Queue()
        self._pending[work.request_id] = events
        outbox = self._outbox
        span = request_trace("dispatch", None, {"moemesh.request_id": work.client_request_id or work.request_id,
                                                "moemesh.model": work.model}, kind="CLIENT")
        span.inject(work.trace_context)  # the scheduler's span for the request is this one's child
        outbox.put_nowait(worker_pb2.ExecuteRequest(add=work))
        finished, tokens, error = False, 0, None
        try:
            while True:
                event = await events.get()
                while not event.finish_reason and not event.HasField("error") and not events.empty():
                    following = events.get_nowait()  # the caller fell behind: hand over one merged event
                    if following.HasField("error"):
                        events.put_nowait(following)  # not mergeable; ends the stream on the next read
                        break
                    event = _merge(event, following)
                if event.HasField("error"):
                    finished = True
                    error = code_name(event.error.code)
                    raise error_from_code(event.error.code, event.error.message, event.error.retry_after_seconds)
                if event.token_ids and not tokens:
                    span.event("first token")
                tokens += len(event.token_ids)
                finished = event.finish_reason != 0
                yield event
                if finished:
                    return
        finally:
            self._pending.pop(work.request_id, None)
            if not finished:
                outbox.put_nowait(worker_pb2.ExecuteRequest(
                    cancel=worker_pb2.Cancel(request_id=work.request_id, reason="client")))
            span.end({"moemesh.completion_tokens": tokens, "moemesh.cancelled": not finished}, error)

    async def embed(self, work: worker_pb2.EmbedWork, timeout: float | None = None) -> worker_pb2.EmbedResult:
        return await self.stub.Embed(work, timeout=timeout, metadata=self.metadata)

    async def list_models(self, timeout: float = 5.0) -> models_pb2.ListModelsResponse:
        return await self.stub.ListModels(models_pb2.ListModelsRequest(), timeout=timeout, metadata=self.metadata)

    async def list_nodes(self, timeout: float = 5.0) -> scheduler_pb2.ListNodesResponse:
        return await self.stub.ListNodes(scheduler_pb2.ListNodesRequest(), timeout=timeout, metadata=self.metadata)

    # ---- the stream --------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.05
        while True:
            outbox: asyncio.Queue[worker_pb2.ExecuteRequest] = asyncio.Queue()
            self._outbox = outbox
            call = self.stub.Dispatch(self._requests(outbox), metadata=self.metadata, wait_for_ready=True)
            try:
                await call.wait_for_connection()
                self.connected.set()
                backoff = 0.05
                async for batch in call:
                    for event in batch.events:
                        queue = self._pending.get(event.request_id)
                        if queue is not None:
                            queue.put_nowait(event)
            except grpc.aio.AioRpcError as exc:
                log.warning("dispatch stream broke", extra={"code": exc.code().name, "backoff": backoff})
            finally:
                self.connected.clear()
                call.cancel()
                self._fail_pending()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    @staticmethod
    async def _requests(outbox: asyncio.Queue) -> AsyncIterator[worker_pb2.ExecuteRequest]:
        while True:
            yield await outbox.get()

    def _fail_pending(self) -> None:
        lost = worker_pb2.RequestError(code=grpc.StatusCode.UNAVAILABLE.value[0],
                                       message="connection to the scheduler was lost; retry")
        for request_id, queue in self._pending.items():
            queue.put_nowait(worker_pb2.RequestEvent(request_id=request_id, error=lost))


def _merge(first: worker_pb2.RequestEvent, second: worker_pb2.RequestEvent) -> worker_pb2.RequestEvent:
    """Two consecutive events of one request as one: text and tokens joined, the second's finish and usage."""
    first.text += second.text
    first.token_ids.extend(second.token_ids)
    first.logprobs.extend(second.logprobs)
    first.prompt_logprobs.extend(second.prompt_logprobs)
    first.finish_reason = second.finish_reason
    if second.HasField("usage"):
        first.usage.CopyFrom(second.usage)
    return first
