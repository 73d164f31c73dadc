"""Scheduler process entry point."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from moemesh.services.core.entrypoint import service_main
from moemesh.services.core.server import GrpcServer, announce_ready, stop_event_on_signals
from moemesh.services.scheduler.config import SchedulerConfig
from moemesh.services.scheduler.dispatcher import Dispatcher
from moemesh.services.scheduler.registry import Registry
from moemesh.services.scheduler.service import SchedulerServicer
from moemesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("moemesh.scheduler")

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


async def expire_forever(registry: Registry) -> None:
    """Evict nodes that missed their heartbeats (checked twice per interval)."""
    while True:
        await asyncio.sleep(registry.heartbeat_interval / 2)
        for node_id in registry.expire():
            log.warning("node evicted: missed heartbeats", extra={"node_id": node_id})


async def serve(config: SchedulerConfig, ready_fd: int | None) -> None:
    stop = stop_event_on_signals()
    registry = Registry(config.heartbeat_interval, config.max_missed_heartbeats)
    dispatcher = Dispatcher(registry, config.dispatch_policy())
    server = GrpcServer(config.host, config.port, grace=config.grace)
    server.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server,
               SchedulerServicer(registry, dispatcher, config.cluster_token), SCHEDULER_SERVICE)
    await server.start()
    expiry = asyncio.create_task(expire_forever(registry))
    await server.set_serving(True)
    announce_ready(ready_fd, service="scheduler", address=server.address)
    await stop.wait()
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expiry
    await server.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--heartbeat-interval", type=float)
    parser.add_argument("--max-missed-heartbeats", type=int)


def main(argv: list[str] | None = None) -> int:
    return service_main(argv, service="scheduler", description=__doc__, config_cls=SchedulerConfig,
                        add_arguments=add_arguments, serve=serve)


if __name__ == "__main__":
    sys.exit(main())
