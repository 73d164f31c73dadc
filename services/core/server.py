"""gRPC server bootstrap shared by every service.

Each server gets the standard health service (NOT_SERVING until the service
says it is ready), server reflection, the error-mapping interceptor, and a
graceful stop: health flips to NOT_SERVING, new calls are refused, in-flight
calls get ``grace`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.services.core.interceptors import ErrorMappingInterceptor

log = logging.getLogger(__name__)

# Large enough for a batch of embeddings or a KV block; requests above it are
# refused by gRPC with RESOURCE_EXHAUSTED before they reach a servicer.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """A ``grpc.aio`` server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        grace: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.grace = grace
        self.credentials = credentials
        self.server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names: list[str] = []
        self.port = 0

    def add(self, register: Callable[[object, grpc.aio.Server], None], servicer: object, name: str) -> None:
        """Add a servicer (``add_XServicer_to_server``, servicer, full service name)."""
        register(servicer, self.server)
        self.service_names.append(name)

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING), return the bound port."""
        names = [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.host}:{self.requested_port}"
        if self.credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.credentials)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self.set_serving(False)
        await self.server.start()
        log.info("grpc server listening", extra={"address": self.address})
        return self.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool, services: Iterable[str] | None = None) -> None:
        """Report the overall health and that of each named service (default: all)."""
        status = SERVING if serving else NOT_SERVING
        for name in ["", *(services if services is not None else self.service_names)]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Refuse new calls and give in-flight ones `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace)


def announce_ready(ready_fd: int | None, **info: object) -> None:
    """Tell the process that started us where we listen: one JSON object on ``ready_fd``."""
    info.setdefault("pid", os.getpid())
    log.info("ready", extra={"ready": info})
    if ready_fd is None:
        return
    with os.fdopen(ready_fd, "w") as pipe:
        pipe.write(json.dumps(info) + "\n")


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (graceful stop), for the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
