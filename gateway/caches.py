"""The gateway's use of the Redis caches: which requests go through them and how hits look to clients.

The caches themselves (Redis keys, entry formats, single-flight, timeouts
and breakers) live in `cache/`; the policy lives here: only deterministic
requests are cached, cache control is honoured, tenants are kept apart
unless the operator shares a scope (`tenants.cache_scope`: a scope named by
several tenants, or one for all).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moemesh.cache.embeddings import EmbeddingCache, pack_embedding, unpack_embedding
from moemesh.cache.response import ResponseCache, response_key
from moemesh.gateway.journal import Journal
from moemesh.gateway.tenants import DEFAULT_TENANT, Tenant, cache_scope
from moemesh.v1 import common_pb2, generation_pb2, models_pb2, worker_pb2

# DEFAULT_TENANT: open mode's one tenant; the embedding entry format is re-exported for the gateway's service.
__all__ = ["DEFAULT_TENANT", "GatewayCaches", "is_deterministic", "pack_embedding", "unpack_embedding"]


def is_deterministic(sampling: common_pb2.SamplingParams, model_defaults_greedy: bool = False) -> bool:
    """Greedy (temperature 0) or seeded sampling: the same inputs give the same output, so it may be cached."""
    if sampling.HasField("seed"):
        return True
    if sampling.HasField("temperature"):
        return sampling.temperature == 0.0
    return model_defaults_greedy


@dataclass
class GatewayCaches:
    """The response and embedding caches, and the scope that keeps tenants apart."""

    responses: ResponseCache
    embeddings: EmbeddingCache
    shared_scope: bool = False  # True: every tenant shares one scope (operator's choice)
    journal: Journal | None = None  # resumable streams (requests that name their own id)

    def scope(self, tenant: Tenant) -> str:
        """The cache scope of a tenant's entries."""
        return cache_scope(tenant, self.shared_scope)

    def events(self, request: generation_pb2.GenerateRequest, model: models_pb2.ModelInfo, scope: str,
               generate) -> AsyncIterator[worker_pb2.RequestEvent]:
        """The request's events, through the response cache (entries of `scope` only) when it is deterministic
        and allowed to."""
        mode = request.cache_mode
        if mode == common_pb2.CACHE_MODE_NO_STORE or not is_deterministic(request.sampling):
            self.responses.stats.bypasses += 1
            return generate()
        key = response_key(scope, model.id, model.revision, request)
        return _mark_hits(self.responses.serve(key, generate, read=mode == common_pb2.CACHE_MODE_DEFAULT))

    def embedding_key(self, tenant: Tenant, model: models_pb2.ModelInfo, normalize: bool, text: str) -> str:
        """The embedding cache key of one input, in the tenant's scope."""
        return EmbeddingCache.key(model.id, model.revision, normalize, text, scope=self.scope(tenant))


async def _mark_hits(pairs) -> AsyncIterator[worker_pb2.RequestEvent]:
    """Events of `ResponseCache.serve`; a replayed answer's usage says so. Closing this closes `pairs` at once
    (its reader leaves the flight), not when the garbage collector gets to it."""
    async with contextlib.aclosing(pairs):
        async for event, cached in pairs:
            if cached and event.finish_reason:
                event.usage.from_response_cache = True
                event.usage.cached_tokens = event.usage.prompt_tokens
            yield event

