"""The gateway's HTTP API (FastAPI): the app, its health routes and the server it runs on.

The OpenAI-compatible routes are gateway/openai_api.py's router; every route reaches the gateway's dependencies
object through FastAPI dependency injection (gateway/http_deps.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import fastapi
import grpc
import uvicorn
from starlette.types import Receive, Scope, Send

from moemesh.cache.client import reachable
from moemesh.gateway import openai_api
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.http_deps import Deps
from moemesh.gateway.openai_errors import add_error_handlers, error_response
from moemesh.services.core.errors import MeshError
from moemesh.services.core.tracing import enabled as tracing_enabled

health = fastapi.APIRouter()


@health.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(response: fastapi.Response, deps: Deps) -> dict:
    """Readiness: connected to the scheduler. Redis is reported, not required."""
    if deps.redis is None:
        cache = "disabled"
    else:
        cache = "up" if await reachable(deps.redis) else "unreachable"
    if not deps.ready.is_set():
        response.status_code = 503
        return {"status": "not ready", "redis": cache}
    return {"status": "ready", "redis": cache}


@health.get("/health")
async def serving(response: fastapi.Response, deps: Deps) -> dict:
    """The route vLLM and TGI serve, which load balancers and benchmark tools (guidellm) probe before they send
    work: /readyz, and also 503 until the mesh serves a model, since there a 200 means a request can be answered.
    (/readyz is the gateway's own readiness: a gateway is ready while its workers load, or restart.)"""
    body = await readyz(response, deps)
    if body["status"] != "ready":
        return body
    try:
        served = bool(await deps.catalogue.models())
    except (MeshError, grpc.aio.AioRpcError):
        served = False
    if not served:
        response.status_code = 503
        body["status"] = "no model served yet"
    return body


def create_app(deps: GatewayDeps) -> fastapi.FastAPI:
    """The HTTP API; /healthz, /readyz and /health are open, every /v1 route needs a credential unless in open mode.

    /docs, /redoc and /openapi.json are served only when GatewayConfig.http_docs is set (they map the API for
    anyone who asks).
    """
    docs = deps.config.http_docs
    app = fastapi.FastAPI(title="moemesh gateway", version="v1", docs_url="/docs" if docs else None,
                          redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.deps = deps
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=deps.config.max_request_bytes)
    app.include_router(openai_api.router)
    app.include_router(health)
    if tracing_enabled():
        # One server span per API request (continuing a caller's traceparent); none for the probes, and none per
        # streamed chunk (the ASGI send/receive spans), which would cost a span per token.
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        FastAPIInstrumentor.instrument_app(app, excluded_urls="/healthz,/readyz,/health",
                                           exclude_spans=["receive", "send"])
    return app


class BodyLimit:
    """Bounds every request body while it is read, chunked or not: 413 as soon as it passes the limit.

    A declared Content-Length above the limit is refused before anything is read. Otherwise the received bytes
    are counted as the app reads them; the read that passes the limit answers 413 (with `Connection: close`, so
    the server stops reading the rest) and the app sees the client as gone, so nothing above the limit is
    buffered, parsed or authenticated. Anything the app still sends after that is dropped.
    """

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, send, f"request body is {int(length)} bytes; the limit is {self.limit}")
            return
        await _BoundedBody(self, scope, receive, send).run()

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        response = error_response(413, message, "invalid_request_error", code="request_too_large",
                                  headers={"Connection": "close"})
        await response(scope, _nothing_to_receive, send)


async def _nothing_to_receive() -> dict:
    return {"type": "http.disconnect"}


class _BoundedBody:
    """One request under BodyLimit: counts the body bytes received, refuses once they pass the limit."""

    def __init__(self, limit: BodyLimit, scope: Scope, receive: Receive, send: Send) -> None:
        self.limit, self.scope, self._receive, self._send = limit, scope, receive, send
        self.received = 0
        self.refused = False  # the 413 went out: the app's own answer is dropped
        self.started = False  # the app began its answer: too late for a 413

    async def run(self) -> None:
        await self.limit.app(self.scope, self.receive, self.send)

    async def receive(self) -> dict:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.limit:
                return await self._over_limit()
        return message

    async def _over_limit(self) -> dict:
        self.refused = True
        if not self.started:
            await self.limit._refuse(self.scope, self._send, f"request body is over the limit of {self.limit.limit} bytes")
        return {"type": "http.disconnect"}  # the app stops reading; the rest of the body is never buffered

    async def send(self, message: dict) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class HttpServer:
    """Uvicorn on a socket we bind ourselves, so port 0 works and the port is known."""

    def __init__(self, app: fastapi.FastAPI, host: str, port: int) -> None:
        self.socket = socket.create_server((host, port))
        self.port = self.socket.getsockname()[1]
        self.host = host
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """host:port the server listens on."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Serve in a background task."""
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="http")

    async def stop(self) -> None:
        """Stop accepting, finish the open requests, and return when the server is down."""
        self.server.should_exit = True
        if self._task is not None:
            await self._task
