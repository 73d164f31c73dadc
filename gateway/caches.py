"""The gateway's use of the Redis caches: which requests go through them and how hits look to clients."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from moemesh.cache.response import EmbeddingCache, ResponseCache, is_deterministic, response_key
from moemesh.gateway.journal import Journal
from moemesh.gateway.tenants import DEFAULT_TENANT  # noqa: F401 - re-exported: open mode's one tenant
from moemesh.v1 import common_pb2, generation_pb2, models_pb2, worker_pb2


@dataclass
class GatewayCaches:
    """The response and embedding caches, and the scope that keeps tenants apart."""

    responses: ResponseCache
    embeddings: EmbeddingCache
    shared_scope: bool = False  # True: every tenant shares one scope (operator's choice)
    journal: Journal | None = None  # resumable streams (requests that name their own id)

    def scope(self, tenant: str) -> str:
        return "shared" if self.shared_scope else f"tenant:{tenant}"

    def events(self, request: generation_pb2.GenerateRequest, model: models_pb2.ModelInfo, tenant: str,
               generate) -> AsyncIterator[worker_pb2.RequestEvent]:
        """The request's events, through the response cache when it is deterministic and allowed to."""
        mode = request.cache_mode
        if mode == common_pb2.CACHE_MODE_NO_STORE or not is_deterministic(request.sampling):
            self.responses.stats.bypasses += 1
            return generate()
        key = response_key(self.scope(tenant), model.id, model.revision, request)
        return _mark_hits(self.responses.serve(key, generate, read=mode == common_pb2.CACHE_MODE_DEFAULT))

    def embedding_key(self, model: models_pb2.ModelInfo, normalize: bool, text: str) -> str:
        return EmbeddingCache.key(model.id, model.revision, normalize, text)


async def _mark_hits(pairs) -> AsyncIterator[worker_pb2.RequestEvent]:
    """Events of `ResponseCache.serve`; a replayed answer's usage says so."""
    async for event, cached in pairs:
        if cached and event.finish_reason:
            event.usage.from_response_cache = True
            event.usage.cached_tokens = event.usage.prompt_tokens
        yield event


def pack_embedding(vector: torch.Tensor, token_count: int) -> bytes:
    """An embedding cache entry: uint32 token count, then the float32 vector."""
    return struct.pack("<I", token_count) + vector.to(torch.float32).contiguous().numpy().tobytes()


def unpack_embedding(raw: bytes) -> tuple[torch.Tensor, int]:
    (count,) = struct.unpack_from("<I", raw)
    return torch.frombuffer(bytearray(raw[4:]), dtype=torch.float32), count
