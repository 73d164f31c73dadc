"""OpenAI-compatible HTTP routes: /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models.

Each body becomes the GenerateRequest or EmbedRequest the gRPC API takes and runs through the same shared path
(`generation.start_generation`, `embedding.embed`): the same validation, limits, scheduler calls and errors. Only
the request and response shapes are OpenAI's (`openai_bodies`, `openai_responses`); errors are answered in
OpenAI's shape by `openai_errors`' handlers.

Deviations from OpenAI: n must be 1; no tools, logit_bias, echo, suffix or best_of; a token in `logprobs` is
written "token_id:<id>".
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import fastapi
import numpy as np
from fastapi.responses import JSONResponse, Response

from moemesh.gateway.deadlines import ClientGone, grace, request_timeout, until_disconnected
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.embedding import embed
from moemesh.gateway.generation import Generation, start_generation
from moemesh.gateway.http_deps import Caller, Deps
from moemesh.gateway.openai_bodies import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingBody
from moemesh.gateway.openai_errors import openai_names
from moemesh.gateway.openai_responses import Answer, ChatShape, CompletionShape, event_stream
from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import InvalidRequest, NotFound
from moemesh.v1 import common_pb2, generation_pb2, models_pb2

T = TypeVar("T")

router = fastapi.APIRouter(prefix="/v1")

_KIND_NAMES = {models_pb2.MODEL_KIND_GENERATION: "generation", models_pb2.MODEL_KIND_EMBEDDING: "embedding"}


def cache_mode(request: fastapi.Request) -> int:
    """The request's `Cache-Control` header as a cache mode: no-store, no-cache, or the default."""
    directives = {d.strip().lower() for d in request.headers.get("Cache-Control", "").split(",")}
    if "no-store" in directives:
        return common_pb2.CACHE_MODE_NO_STORE
    if "no-cache" in directives:
        return common_pb2.CACHE_MODE_NO_CACHE
    return common_pb2.CACHE_MODE_DEFAULT


# ---- generation --------------------------------------------------------------------------------------------------
@router.post("/completions")
async def completions(body: CompletionRequest, request: fastapi.Request, deps: Deps, tenant: Caller) -> Response:
    """A text completion of one prompt."""
    body.check_supported()
    return await _generate(deps, request, tenant, body, CompletionShape(logprobs=body.logprobs is not None))


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: fastapi.Request, deps: Deps,
                           tenant: Caller) -> Response:
    """The assistant's next message in a chat."""
    body.check_supported()
    return await _generate(deps, request, tenant, body, ChatShape(logprobs=bool(body.logprobs)))


async def _generate(deps: GatewayDeps, request: fastapi.Request, tenant: Tenant, body: SamplingBody,
                    shape: CompletionShape) -> Response:
    """Run the body's generation and answer in the endpoint's shape: streamed (SSE) or whole; 499 when the
    client went away first."""
    timeout = request_timeout(request)
    grpc_request = body.generate_request(cache_mode(request))
    try:
        if body.stream:
            generation, (events, first) = await _admit(deps, request, grpc_request, body, tenant, timeout,
                                                       _first_event)
            return event_stream(generation, events, first, body.include_usage, shape)
        generation, answer = await _admit(deps, request, grpc_request, body, tenant, timeout, _whole_answer)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(shape.answer(generation, answer), headers={"X-Request-Id": generation.request_id})


async def _admit(deps: GatewayDeps, request: fastapi.Request, grpc_request: generation_pb2.GenerateRequest,
                 body: SamplingBody, tenant: Tenant, timeout: float | None,
                 then: Callable[[Generation], Awaitable[T]]) -> tuple[Generation, T]:
    """Start the generation and await `then` on it (its first event, or the whole answer), so that a refusal
    (invalid, overloaded, unavailable) is still an HTTP error status; cancelled when the client disconnects or
    the deadline passes. Validation errors name the OpenAI parameter."""

    async def run() -> tuple[Generation, T]:
        with openai_names(body.param_names()):
            generation = await start_generation(deps, grpc_request, tenant=tenant, timeout=timeout)
            return generation, await then(generation)

    return await until_disconnected(request.receive, run(), grace(timeout))


async def _first_event(generation: Generation) -> tuple[AsyncIterator[generation_pb2.GenerateResponse],
                                                        generation_pb2.GenerateResponse | None]:
    """The generation's open event stream and its first event (closed again if that fails)."""
    events = generation.responses()
    try:
        return events, await anext(events, None)
    except BaseException:
        await events.aclose()
        raise


async def _whole_answer(generation: Generation) -> Answer:
    return await Answer().collect(generation)


# ---- embeddings --------------------------------------------------------------------------------------------------
@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: fastapi.Request, deps: Deps, tenant: Caller) -> Response:
    """Embeddings of one or more texts, as float lists or base64 float32."""
    timeout = request_timeout(request)
    grpc_request = body.embed_request(cache_mode(request))

    async def run():
        with openai_names(body.param_names()):
            return await embed(deps, grpc_request, tenant=tenant, timeout=timeout)

    try:
        result = await until_disconnected(request.receive, run(), grace(timeout))
    except ClientGone:
        return Response(status_code=499)
    if body.dimensions is not None and body.dimensions != result.dimensions:
        raise InvalidRequest("dimensions", f"{result.model} gives {result.dimensions} dimensions only, "
                                           f"got {body.dimensions}")
    data = [{"object": "embedding", "index": item.index, "embedding": _vector(item.values, body.encoding_format)}
            for item in result.embeddings]
    return JSONResponse({
        "object": "list", "data": data, "model": result.model,
        "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens},
    }, headers={"X-Request-Id": result.request_id})


def _vector(values, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    return list(values)


# ---- models ------------------------------------------------------------------------------------------------------
@router.get("/models")
async def list_models(deps: Deps, tenant: Caller) -> dict:
    """The served models the caller's tenant may use."""
    return {"object": "list", "data": [_model_object(m) for m in await deps.catalogue.visible_to(tenant)]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, deps: Deps, tenant: Caller) -> dict:
    """One served model the caller's tenant may use; 404 otherwise."""
    for m in await deps.catalogue.visible_to(tenant):
        if m.id == model_id:
            return _model_object(m)
    raise NotFound(f"model {model_id!r} is not served")


def _model_object(m: models_pb2.ModelInfo) -> dict:
    return {"id": m.id, "object": "model", "owned_by": "moemesh", "revision": m.revision,
            "kind": _KIND_NAMES.get(m.kind, "unknown"), "max_context_tokens": m.max_context_tokens,
            "ready_replicas": m.ready_replicas}
