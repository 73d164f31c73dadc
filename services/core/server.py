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
from collections.abc import Callable, Iterable, Sequence

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moemesh.services.core.interceptors import ErrorMappingInterceptor
from moemesh.services.core.tracing import server_interceptors

log = logging.getLogger(__name__)

# Large enough for a batch of embeddings or a KV block; requests above it are
# refused by gRPC with RESOURCE_EXHAUSTED before they reach a servicer.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# Health check names: "" (and each service's name) is readiness; this one is liveness.
LIVENESS_SERVICE = "moemesh.liveness"


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
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.host = host
        self.requested_port = port
        self.grace = grace
        self.credentials = credentials
        self.server = grpc.aio.server(
            # Tracing outermost (its span sees the mapped status); inner interceptors' errors get mapped too.
            interceptors=[*server_interceptors(), ErrorMappingInterceptor(), *interceptors],
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
        """Add a servicer (``add_XServicer_to_server``, servicer, full service name).

        Requests that cannot be parsed (bytes that are not the message, a
        string field that is not UTF-8) get INVALID_ARGUMENT naming the
        request, rather than gRPC's UNKNOWN.
        """
        register(servicer, _CheckedParsing(self.server))
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
        await self.health.set(LIVENESS_SERVICE, SERVING)  # alive as soon as it answers; readiness is ""
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


class _Unparsable:
    """What a request that failed to parse turns into; its handler answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _checked_deserializer(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(raw: bytes) -> object:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return _Unparsable(exc)

    return parse


async def _refuse(request: _Unparsable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: cannot be parsed ({request.error})")


def _checked_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, refusing unparsable unary requests (streamed requests are left as they are)."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    if handler.response_streaming:
        behaviour = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, _Unparsable):
                await _refuse(request, context)
                return
            async for response in behaviour(request, context):
                yield response

        return handler._replace(request_deserializer=_checked_deserializer(handler.request_deserializer),
                                unary_stream=unary_stream)
    behaviour = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, _Unparsable):
            await _refuse(request, context)
        return await behaviour(request, context)

    return handler._replace(request_deserializer=_checked_deserializer(handler.request_deserializer),
                            unary_unary=unary_unary)


class _CheckedParsing:
    """Stands in for the server while generated code registers a servicer, wrapping each method handler."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_CheckedGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: _checked_handler(h) for name, h in method_handlers.items()})


class _CheckedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service_name(self):  # reflection and health read it when present
        return self._inner.service_name() if hasattr(self._inner, "service_name") else None

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        return _checked_handler(handler) if handler is not None else None
