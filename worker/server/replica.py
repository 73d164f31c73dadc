"""Rank 0 of an expert-parallel replica: opening the exchange to its shards, and watching that they live.

The exchange (worker/ops/remote.py) notices a dead or stalled shard only
when a forward reads from it. `ShardWatch` also follows each shard's health
stream from the event loop, so that a shard that dies, or stops serving,
while the replica is idle fails the replica at once: the engine takes its
failure path (NOT_SERVING, deregister, in-flight requests UNAVAILABLE, exit)
and the supervisor restarts rank 0, which reconnects to the restarted shard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.services.core.tls import aio_channel
from moemesh.worker.models.checkpoint import Checkpoint
from moemesh.worker.models.placement import ExpertPlacement
from moemesh.worker.ops.remote import ExpertExchange, ExpertParallelConfig, ExpertShardFailed
from moemesh.worker.server.config import WorkerConfig
from moemesh.worker.server.shard import EXPERT_SHARD_SERVICE, require_placement

log = logging.getLogger(__name__)


def replica_placement(config: WorkerConfig, checkpoint: Checkpoint) -> ExpertPlacement | None:
    """The replica's expert placement (None for a single-process worker); a placement that does not fit the
    checkpoint stops the process (status 2, one line naming ep_placement)."""
    if not config.shard_addresses:
        return None  # the config refuses ep_placement without ep_shards
    return require_placement("worker", checkpoint, config.ep_placement, len(config.shard_addresses) + 1)


def connect_exchange(config: WorkerConfig, checkpoint: Checkpoint, placement: ExpertPlacement) -> ExpertExchange:
    """Open rank 0's streams to its shards (run it on the engine thread, which will use them)."""
    token = config.cluster_token.get_secret_value() if config.cluster_token else None
    return ExpertExchange.connect(
        ExpertParallelConfig(placement, config.shard_addresses, exchange_timeout=config.ep_exchange_timeout,
                             connect_timeout=config.ep_connect_timeout, cluster_token=token,
                             tls_dir=config.tls_dir),
        checkpoint.revision)


class ShardWatch:
    """Follows each shard's health stream; the first shard that dies or stops serving calls `on_lost` once."""

    def __init__(self, shards: tuple[str, ...], tls_dir, on_lost: Callable[[ExpertShardFailed], None]) -> None:
        self.shards, self.tls_dir, self.on_lost = shards, tls_dir, on_lost
        self._tasks: list[asyncio.Task] = []
        self._lost = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(rank, address), name=f"watch shard {rank}")
                       for rank, address in enumerate(self.shards, start=1)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, rank: int, address: str) -> None:
        where = f"expert shard rank {rank} at {address}"
        async with aio_channel(address, self.tls_dir, "worker") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=EXPERT_SHARD_SERVICE))
            try:
                async for reply in watch:
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        return self._report(f"{where} stopped serving")
            except grpc.aio.AioRpcError as exc:
                return self._report(f"{where}: health stream broke: {exc.code().name}")
            self._report(f"{where} closed its health stream")

    def _report(self, why: str) -> None:
        if not self._lost:
            self._lost = True
            log.error("expert-parallel replica lost a shard: %s", why)
            self.on_lost(ExpertShardFailed(why))
