"""The gateway's view of which models the mesh serves, refreshed from the scheduler."""

from __future__ import annotations

import time

from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import InvalidRequest, Unavailable
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import models_pb2

REFRESH_SECONDS = 1.0


class ModelCatalogue:
    """Cached ListModels answer; resolves a request's model id (or the default)."""

    def __init__(self, client: SchedulerClient, default_model: str | None, default_embedding_model: str | None) -> None:
        self.client = client
        self.defaults = {models_pb2.MODEL_KIND_GENERATION: default_model,
                         models_pb2.MODEL_KIND_EMBEDDING: default_embedding_model}
        self._models: list[models_pb2.ModelInfo] = []
        self._fetched_at = float("-inf")
        self._seen: set[tuple[str, int]] = set()  # (id, kind) of every model the scheduler has listed

    async def models(self) -> list[models_pb2.ModelInfo]:
        """Every served model, as the scheduler listed it at most REFRESH_SECONDS ago."""
        if time.monotonic() - self._fetched_at > REFRESH_SECONDS:
            self._models = list((await self.client.list_models()).models)
            self._fetched_at = time.monotonic()
            self._seen.update((m.id, m.kind) for m in self._models)
        return self._models

    async def visible_to(self, tenant: Tenant) -> list[models_pb2.ModelInfo]:
        """The served models a tenant may use."""
        return [m for m in await self.models() if tenant.allows(m.id)]

    async def resolve(self, model_id: str, kind: int, tenant: Tenant) -> models_pb2.ModelInfo:
        """The served model a request names (whether `tenant` may use it is checked after). Unavailable
        (retryable) while it has no ready replica but was served before, or while no model of its kind is served
        (a mesh starting up, or between a lone replica's loss and its return); else InvalidRequest naming `model`,
        with the served models the tenant may use."""
        models = [m for m in await self.models() if m.kind == kind]
        wanted = model_id or self.defaults[kind]
        if not wanted:
            if not models:
                raise Unavailable("no model of this kind is being served yet")
            return models[0]
        for model in models:
            if model.id == wanted:
                return model
        if tenant.allows(wanted) and (wanted, kind) in self._seen:
            raise Unavailable(f"model {wanted!r} has no ready replica at the moment; retry")
        if not models:
            raise Unavailable(f"no model of this kind is being served yet, {wanted!r} included; retry")
        served = ", ".join(sorted(m.id for m in models if tenant.allows(m.id))) or "none for this API key"
        raise InvalidRequest("model", f"unknown model {wanted!r}; served: {served}")
