"""The gateway's HTTP API (FastAPI): health checks, the model list and the OpenAI-compatible routes
(gateway/openai_api.py: /v1/completions, /v1/chat/completions, /v1/embeddings).
"""

from __future__ import annotations

import asyncio
import socket

import fastapi
import redis.asyncio as aioredis
import uvicorn

from moemesh.cache.client import reachable
from moemesh.gateway import openai_api
from moemesh.gateway.caches import GatewayCaches
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.ratelimit import RateLimiter
from moemesh.gateway.tenants import Authenticator, Tenant
from moemesh.services.core.errors import NotFound
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import models_pb2

_KIND_NAMES = {models_pb2.MODEL_KIND_GENERATION: "generation", models_pb2.MODEL_KIND_EMBEDDING: "embedding"}


def _model_object(m: models_pb2.ModelInfo) -> dict:
    return {"id": m.id, "object": "model", "owned_by": "moemesh", "revision": m.revision,
            "kind": _KIND_NAMES.get(m.kind, "unknown"), "max_context_tokens": m.max_context_tokens,
            "ready_replicas": m.ready_replicas}


def create_app(catalogue: ModelCatalogue, ready: asyncio.Event, redis: aioredis.Redis | None, *,
               config: GatewayConfig, client: SchedulerClient, caches: GatewayCaches | None = None,
               auth: Authenticator | None = None, limiter: RateLimiter | None = None) -> fastapi.FastAPI:
    """The HTTP API; /healthz and /readyz are open, every /v1 route needs a credential unless in open mode."""
    app = fastapi.FastAPI(title="moemesh gateway", version="v1")
    auth = auth or Authenticator()
    openai_api.register(app, config=config, client=client, catalogue=catalogue, caches=caches, auth=auth,
                        limiter=limiter)
    caller = fastapi.Depends(openai_api.tenant_dependency(auth))

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
    async def list_models(tenant: Tenant = caller) -> dict:
        """The served models the caller's tenant may use."""
        models = [m for m in await catalogue.models() if tenant.allows(m.id)]
        return {"object": "list", "data": [_model_object(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, tenant: Tenant = caller) -> dict:
        for m in await catalogue.models():
            if m.id == model_id and tenant.allows(m.id):
                return _model_object(m)
        raise NotFound(f"model {model_id!r} is not served")

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
