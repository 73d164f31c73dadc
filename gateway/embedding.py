"""The one embedding path, shared by gRPC `Embed` and the OpenAI embeddings route.

Resolve the model, authorize the tenant, validate the inputs, charge the rate limits, take what the embedding
cache holds, embed only the rest upstream (and store them), and write the request's audit record.
"""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np

from moemesh.cache.embeddings import pack_embedding, unpack_embedding
from moemesh.gateway.audit import status_name
from moemesh.gateway.caches import GatewayCaches
from moemesh.gateway.calls import NO_CALL_CONTEXT, CallContext
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.ratelimit import estimate_text_tokens
from moemesh.gateway.tenants import OPEN_TENANT, Tenant
from moemesh.gateway.validation import validate_embed_inputs
from moemesh.services.core.errors import error_from_rpc
from moemesh.services.core.logs import bind_request
from moemesh.services.core.tensor_rows import row_bytes
from moemesh.services.core.tracing import span
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import common_pb2, embeddings_pb2, models_pb2, worker_pb2


async def embed(deps: GatewayDeps, request: embeddings_pb2.EmbedRequest, *, tenant: Tenant = OPEN_TENANT,
                timeout: float | None = None, call: CallContext = NO_CALL_CONTEXT) -> embeddings_pb2.EmbedResponse:
    """Validate an EmbedRequest and embed its inputs (shared by the gRPC servicer and the HTTP API).

    With the embedding cache, inputs found there are not sent upstream; only the rest are embedded. The
    response's id is the request's, else the caller's X-Request-Id (`call`), else a fresh one.
    """
    started = time.perf_counter()
    request_id = request.request_id or call.request_id or uuid.uuid4().hex
    bind_request(request_id, call.trace)  # this call's log lines name the request
    try:
        response = await _embed(deps, request, tenant, timeout)
        response.request_id = request_id
    except BaseException as exc:
        deps.audit.record("embed", request_id, tenant.id, request.model, status_name(exc), started,
                          inputs=len(request.inputs))
        raise
    deps.audit.record("embed", response.request_id, tenant.id, response.model, "OK", started,
                      inputs=len(request.inputs), prompt_tokens=response.usage.prompt_tokens,
                      cached_tokens=response.usage.cached_tokens)
    return response


async def _embed(deps: GatewayDeps, request: embeddings_pb2.EmbedRequest, tenant: Tenant,
                 timeout: float | None) -> embeddings_pb2.EmbedResponse:
    model = await deps.catalogue.resolve(request.model, models_pb2.MODEL_KIND_EMBEDDING, tenant)
    tenant.check_model(model.id)
    inputs = list(request.inputs)
    validate_embed_inputs(inputs, model)
    release = deps.in_flight.acquire(tenant)  # before any charge: a refusal here costs the tenant nothing
    try:
        if deps.limiter is not None:
            await deps.limiter.check(tenant, estimate_text_tokens(inputs))
        return await _embed_admitted(deps, request, tenant, model, inputs, timeout)
    finally:
        release()


async def _embed_admitted(deps: GatewayDeps, request: embeddings_pb2.EmbedRequest, tenant: Tenant,
                          model: models_pb2.ModelInfo, inputs: list[str],
                          timeout: float | None) -> embeddings_pb2.EmbedResponse:
    """An admitted request's vectors: from the tenant's cache where it may, computed for the rest."""
    normalize = request.normalize if request.HasField("normalize") else True
    use_cache = deps.caches is not None and request.cache_mode == common_pb2.CACHE_MODE_DEFAULT and model.dimensions > 0
    caches = deps.caches if use_cache else None
    vectors: list[np.ndarray | None] = [None] * len(inputs)
    counts = [0] * len(inputs)
    keys = await _from_cache(caches, tenant, model, normalize, inputs, vectors, counts)
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:
        await _compute(deps.client, model, normalize, inputs, missing, vectors, counts, timeout)
        if caches is not None and request.cache_mode != common_pb2.CACHE_MODE_NO_STORE:
            await caches.embeddings.put_many({keys[i]: pack_embedding(vectors[i], counts[i]) for i in missing})
    return _response(request, model, vectors, counts, set(missing))


async def _from_cache(caches: GatewayCaches | None, tenant: Tenant, model: models_pb2.ModelInfo, normalize: bool,
                      inputs: list[str], vectors: list[np.ndarray | None], counts: list[int]) -> list[str]:
    """Fill `vectors` and `counts` with the cached entries of the tenant's scope; the inputs' cache keys (none
    without a cache)."""
    if caches is None:
        return []
    keys = [caches.embedding_key(tenant, model, normalize, text) for text in inputs]
    with span("cache lookup", {"moemesh.cache.tier": "embedding", "moemesh.cache.keys": len(keys)}):
        for i, raw in enumerate(await caches.embeddings.get_many(keys, model.dimensions)):
            if raw is not None:
                vectors[i], counts[i] = unpack_embedding(raw)
    return keys


async def _compute(client: SchedulerClient, model: models_pb2.ModelInfo, normalize: bool, inputs: list[str],
                   missing: list[int], vectors: list[np.ndarray | None], counts: list[int],
                   timeout: float | None) -> None:
    """Embed the `missing` inputs upstream, filling their `vectors` and `counts`."""
    work = worker_pb2.EmbedWork(model=model.id, inputs=[inputs[i] for i in missing], normalize=normalize)
    try:
        result = await client.embed(work, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None
    computed = _float_rows(result.vectors, len(missing))  # [len(missing), D]
    for row, i in enumerate(missing):
        vectors[i], counts[i] = computed[row], result.token_counts[row]


def _response(request: embeddings_pb2.EmbedRequest, model: models_pb2.ModelInfo, vectors: list[np.ndarray],
              counts: list[int], fresh: set[int]) -> embeddings_pb2.EmbedResponse:
    matrix = np.stack(vectors)  # [N, D]
    return embeddings_pb2.EmbedResponse(
        model=model.id,
        dimensions=matrix.shape[1],
        embeddings=[embeddings_pb2.Embedding(index=i, values=row) for i, row in enumerate(matrix.tolist())],
        usage=common_pb2.Usage(prompt_tokens=sum(counts),
                               cached_tokens=sum(c for i, c in enumerate(counts) if i not in fresh)),
    )


def _float_rows(vectors: common_pb2.Tensor, rows: int) -> np.ndarray:
    """The worker's [rows, D] vectors (float32, float16 or bfloat16 on the wire: services.core.tensors) as float32,
    decoded with numpy: the gateway imports no torch (seconds of each start, a quarter GiB resident)."""
    wire = _NUMPY_WIRE.get(vectors.dtype)
    if wire is None or len(vectors.shape) != 2 or row_bytes(vectors, rows) is None:
        raise ValueError(f"the worker answered {rows} inputs with a {vectors.dtype!r} tensor of shape "
                         f"{list(vectors.shape)} and {len(vectors.data)} bytes")
    flat = np.frombuffer(vectors.data, dtype=wire)
    if vectors.dtype == "bfloat16":  # the upper half of a float32's bits
        flat = (flat.astype("<u4") << 16).view("<f4")
    return flat.astype("<f4", copy=False).reshape(tuple(vectors.shape))


_NUMPY_WIRE = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}  # bfloat16: its raw 16 bits
