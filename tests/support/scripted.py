"""The gateway's HTTP app against a scripted scheduler client: the OpenAI routes without a mesh behind them."""

from __future__ import annotations

import asyncio

from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.http import create_app
from moemesh.v1 import models_pb2, worker_pb2


class ScriptedClient:
    """Stands in for SchedulerClient: `script(work)` gives the events (or raises); records the works and the
    closed generations. It serves one generation model, "m"."""

    def __init__(self, script) -> None:
        self.script = script
        self.connected = asyncio.Event()
        self.connected.set()
        self.works: list[worker_pb2.GenerationWork] = []
        self.closed: list[str] = []

    async def list_models(self, timeout: float = 5.0) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(models=[models_pb2.ModelInfo(
            id="m", kind=models_pb2.MODEL_KIND_GENERATION, max_output_tokens=64, max_context_tokens=256)])

    async def generate(self, work: worker_pb2.GenerationWork):
        self.works.append(work)
        try:
            async for event in self.script(work):
                yield event
        finally:
            self.closed.append(work.request_id)


def scripted_app(script, **config):
    """The gateway's HTTP app on a ScriptedClient running `script` (`config`: GatewayConfig fields); (app, client)."""
    fake = ScriptedClient(script)
    deps = GatewayDeps(config=GatewayConfig(scheduler="127.0.0.1:1", **config), client=fake,
                       catalogue=ModelCatalogue(fake, None, None))
    return create_app(deps), fake
