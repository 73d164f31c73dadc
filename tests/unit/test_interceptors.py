"""The error-mapping interceptor wraps every kind of handler, including streams written with `context.write`."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moemesh.services.core.interceptors import ErrorMappingInterceptor


@pytest.mark.asyncio
async def test_health_watch_streams_status_changes_through_the_interceptor():
    """Orchestrators and the scheduler watch health: a worker turning NOT_SERVING must reach the watcher."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            first = await asyncio.wait_for(call.read(), 5)
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            second = await asyncio.wait_for(call.read(), 5)
            call.cancel()
        assert (first.status, second.status) == (health_pb2.HealthCheckResponse.SERVING,
                                                 health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        await server.stop(0)
