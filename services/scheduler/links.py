"""Persistent execution streams from the scheduler to each worker."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import AsyncIterator, Callable

import grpc

from moemesh.services.core.auth import bearer_metadata
from moemesh.services.core.tls import aio_channel
from moemesh.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class WorkerLink:
    """One open Worker.Execute stream: send work and cancellations, receive event batches."""

    def __init__(
        self,
        node_id: str,
        address: str,
        on_batch: Callable[[str, worker_pb2.EventBatch], None],
        on_closed: Callable[[str], None],
        tls_dir: pathlib.Path | None = None,
        cluster_token: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.channel = aio_channel(address, tls_dir, "scheduler")
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.metadata = bearer_metadata(cluster_token)  # every call to the worker presents the cluster token
        self._outbox: asyncio.Queue[worker_pb2.ExecuteRequest | None] = asyncio.Queue()
        self._on_batch = on_batch
        self._on_closed = on_closed
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"link-{self.node_id}")

    def send(self, message: worker_pb2.ExecuteRequest) -> None:
        self._outbox.put_nowait(message)

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.channel.close()

    async def _requests(self) -> AsyncIterator[worker_pb2.ExecuteRequest]:
        while (message := await self._outbox.get()) is not None:
            yield message

    async def _pump(self) -> None:
        try:
            async for batch in self.stub.Execute(self._requests(), metadata=self.metadata, wait_for_ready=True):
                self._on_batch(self.node_id, batch)
        except grpc.aio.AioRpcError as exc:
            log.warning("worker stream broke", extra={"node_id": self.node_id, "code": exc.code().name})
        finally:
            self._on_closed(self.node_id)
