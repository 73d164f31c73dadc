"""The gateway's HTTP API (FastAPI): the app, its health routes and the server it runs on.

The OpenAI-compatible routes are gateway/openai_api.py's router; every route reaches the gateway's dependencies
object through FastAPI dependency injection (gateway/http_deps.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import fastapi
import uvicorn
from starlette.types import Receive, Scope, Send

from moemesh.cache.client import reachable
from moemesh.gateway import openai_api
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.http_deps import Deps
from moemesh.gateway.openai_errors import add_error_handlers, error_response

health = fastapi.APIRouter()


@health.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@health.get("/readyz")
@health.get("/health")  # the route vLLM and TGI serve, which load balancers and benchmark tools probe
async def readyz(response: fastapi.Response, deps: Deps) -> dict:
    """Readiness: connected to the scheduler. Redis is reported, not required. Also served as /health."""
    if deps.redis is None:
        cache = "disabled"
    else:
        cache = "up" if await reachable(deps.redis) else "unreachable"
    if not deps.ready.is_set():
        response.status_code = 503
        return {"status": "not ready", "redis": cache}
    return {"status": "ready", "redis": cache}


def create_app(deps: GatewayDeps) -> fastapi.FastAPI:
    """The HTTP API; /healthz, /readyz and /health are open, every /v1 route needs a credential unless in open mode."""
    app = fastapi.FastAPI(title="moemesh gateway", version="v1")
    app.state.deps = deps
    add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=deps.config.max_request_bytes)
    app.include_router(openai_api.router)
    app.include_router(health)
    return app


class BodyLimit:
    """Refuses a body above the gateway's max_request_bytes (as gRPC does) before it is read: 413."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = error_response(413, f"request body is {int(length)} bytes; the limit is {self.limit}",
                                          "invalid_request_error", code="request_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
