"""The gateway's HTTP API (FastAPI): health checks and the model list.

The OpenAI-compatible generation and embedding routes build on this app.
"""

from __future__ import annotations

import asyncio
import socket

import fastapi
import redis.asyncio as aioredis
import uvicorn

from moemesh.cache.client import reachable
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.v1 import models_pb2

_KIND_NAMES = {models_pb2.MODEL_KIND_GENERATION: "generation", models_pb2.MODEL_KIND_EMBEDDING: "embedding"}


def create_app(catalogue: ModelCatalogue, ready: asyncio.Event, redis: aioredis.Redis | None) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="moemesh gateway", version="v1")

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(response: fastapi.Response) -> dict:
        """Readiness: connected to the scheduler. Redis is reported, not required."""
        if redis is None:
            cache = "disabled"
        else:
            cache = "up" if await reachable(redis) else "unreachable"
        if not ready.is_set():
            response.status_code = 503
            return {"status": "not ready", "redis": cache}
        return {"status": "ready", "redis": cache}

    @app.get("/v1/models")
    async def list_models() -> dict:
        models = await catalogue.models()
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "owned_by": "moemesh", "revision": m.revision,
             "kind": _KIND_NAMES.get(m.kind, "unknown"), "max_context_tokens": m.max_context_tokens,
             "ready_replicas": m.ready_replicas}
            for m in models
        ]}

    return app


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
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.socket]), name="http")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
