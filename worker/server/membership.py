"""Keeps this worker registered with the scheduler: register, heartbeat, re-register.

A broken heartbeat stream or a REREGISTER reply (the scheduler restarted and
lost its registry) sends the worker back to registering, with exponential
backoff, so the mesh heals with no manual step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from moemesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

MAX_BACKOFF = 2.0  # seconds between registration attempts, at most


class Membership:
    """Registration and the heartbeat stream of one worker process."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        registration: scheduler_pb2.RegisterRequest,
        load: Callable[[], scheduler_pb2.NodeLoad],
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.stub = scheduler_pb2_grpc.SchedulerStub(channel)
        self.registration = registration
        self.load = load
        self.metadata = metadata
        self.lease_id = ""
        self.registered = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="membership")

    async def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; tell the scheduler we left (best effort)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if deregister and self.lease_id:
            request = scheduler_pb2.DeregisterRequest(node_id=self.registration.node_id, lease_id=self.lease_id)
            try:
                await self.stub.Deregister(request, metadata=self.metadata, timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                log.warning("deregister failed", extra={"code": exc.code().name})

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                await self._register()
                backoff = 0.05
                await self._heartbeat()
            except grpc.aio.AioRpcError as exc:
                log.warning("scheduler unreachable, retrying", extra={"code": exc.code().name, "backoff": backoff})
            self.registered.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _register(self) -> None:
        reply = await self.stub.Register(self.registration, metadata=self.metadata, timeout=5.0, wait_for_ready=True)
        self.lease_id = reply.lease_id
        self.interval = reply.heartbeat_interval or 1.0
        self.registered.set()
        log.info("registered", extra={"lease_id": reply.lease_id, "node_id": self.registration.node_id})

    async def _heartbeat(self) -> None:
        """Send load every interval until the stream breaks or asks us to re-register."""
        call = self.stub.Heartbeat(self._beats(), metadata=self.metadata)
        async for reply in call:
            if reply.command == scheduler_pb2.HeartbeatReply.COMMAND_REREGISTER:
                log.info("scheduler asked to re-register")
                call.cancel()
                return

    async def _beats(self) -> AsyncIterator[scheduler_pb2.HeartbeatRequest]:
        while True:
            yield scheduler_pb2.HeartbeatRequest(
                node_id=self.registration.node_id, lease_id=self.lease_id, load=self.load()
            )
            await asyncio.sleep(self.interval)
