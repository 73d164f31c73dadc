"""OpenAI-compatible HTTP routes: /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/models.

Each body becomes the GenerateRequest or EmbedRequest the gRPC API takes and runs through the same shared path
(`generation.start_generation`, `embedding.embed`): the same validation, limits, scheduler calls and errors. Only
the request and response shapes are OpenAI's (`openai_bodies`, `openai_responses`); errors are answered in
OpenAI's shape by `openai_errors`' handlers.

A body with several choices (`n`, a list of prompts) runs one generation per choice, started together: a refusal
of any is the request's error; the answer's id and `X-Request-Id` are the first choice's.

Deviations from OpenAI: n ≤ 16 and prompts × n ≤ 64; with a seed s, choice j samples with s + j; usage counts
each choice's prompt (OpenAI counts a prompt once); no logit_bias or suffix; best_of only equal to n; token-id
prompts refused; `response_format` and vLLM's `guided_*` on both endpoints, the schema enforced whether `strict`
or not; tool calls under tool_choice "auto" are read from Hermes/Qwen `<tool_call>` or Mistral `[TOOL_CALLS]`
text whatever the model, and tool_choice "none" hides the tools from the chat template (see `tools`); the
legacy `functions`/`function_call` are refused; a logprob token is its text decoded alone, `bytes` that text's
UTF-8, completions' top_logprobs include the token itself, and `text_offset` is null.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import fastapi
import numpy as np
from fastapi.responses import JSONResponse, Response

from moemesh.gateway import json_body
from moemesh.gateway.calls import CallContext, http_call_context
from moemesh.gateway.deadlines import ClientGone, grace, request_timeout, until_disconnected
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.embedding import embed
from moemesh.gateway.generation import Generation, start_generation
from moemesh.gateway.http_deps import Caller, Deps
from moemesh.gateway.openai_bodies import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingBody
from moemesh.gateway.openai_errors import openai_names
from moemesh.gateway.openai_responses import Answer, ChatShape, CompletionShape, Stream, event_stream
from moemesh.gateway.tenants import Tenant
from moemesh.services.core.errors import InvalidRequest, NotFound
from moemesh.v1 import common_pb2, generation_pb2, models_pb2

T = TypeVar("T")

router = json_body.router(prefix="/v1")  # bodies decoded strictly (UTF-8, no lone surrogate)

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
    """Text completions: `n` choices of each prompt."""
    body.check_supported()
    return await _generate(deps, request, tenant, body, CompletionShape(body.echoes(), body.logprobs is not None))


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: fastapi.Request, deps: Deps,
                           tenant: Caller) -> Response:
    """The assistant's next message in a chat (`n` choices of it): text or tool calls."""
    body.check_supported()
    shape = ChatShape(body.choices_per_prompt, bool(body.logprobs), body.tool_policy)
    return await _generate(deps, request, tenant, body, shape)


async def _generate(deps: GatewayDeps, request: fastapi.Request, tenant: Tenant, body: SamplingBody,
                    shape: CompletionShape) -> Response:
    """Run the body's generations (one per choice) and answer in the endpoint's shape: streamed (SSE) or whole;
    499 when the client went away first."""
    timeout = request_timeout(request)
    call = http_call_context(request.headers)
    grpc_requests = body.generate_requests(cache_mode(request))
    try:
        if body.stream:
            generations, streams = await _admit(deps, request, grpc_requests, body, tenant, timeout, call,
                                                _open_streams)
            return event_stream(generations, streams, body.include_usage, shape)
        generations, answers = await _admit(deps, request, grpc_requests, body, tenant, timeout, call,
                                            _whole_answers)
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(shape.answer(generations, answers), headers={"X-Request-Id": generations[0].request_id})


async def _admit(deps: GatewayDeps, request: fastapi.Request, grpc_requests: list[generation_pb2.GenerateRequest],
                 body: SamplingBody, tenant: Tenant, timeout: float | None, call: CallContext,
                 then: Callable[[list[Generation]], Awaitable[T]]) -> tuple[list[Generation], T]:
    """Start every generation and await `then` on them (their first events, or whole answers), so that a refusal
    of any (invalid, overloaded, unavailable) is still an HTTP error status for the whole request; cancelled
    when the client disconnects or the deadline passes. Validation errors name the OpenAI parameter."""

    async def run() -> tuple[list[Generation], T]:
        generations: list[Generation] = []
        try:
            with openai_names(body.param_names()):
                for r in grpc_requests:
                    generations.append(await start_generation(deps, r, tenant=tenant, timeout=timeout, call=call))
                return generations, await then(generations)
        except BaseException:  # the request failed: the choices started so far end (their events may never be read)
            for generation in generations:
                generation.close()
            raise

    return await until_disconnected(request.receive, run(), grace(timeout))


async def _all(awaitables: list[Awaitable[T]]) -> list[T]:
    """The results of awaiting all at once; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # a failure, or this call cancelled: nothing keeps running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # the first failure in choice order (not the cancellations it caused)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


async def _first_event(events: AsyncIterator[generation_pb2.GenerateResponse]
                       ) -> generation_pb2.GenerateResponse | None:
    return await anext(events, None)


async def _open_streams(generations: list[Generation]) -> list[Stream]:
    """Each generation's open event stream and its first event (all closed again if any fails)."""
    opened = [g.responses() for g in generations]
    try:
        firsts = await _all([_first_event(events) for events in opened])
    except BaseException:
        for events in opened:
            await events.aclose()
        raise
    return list(zip(opened, firsts))


async def _whole_answers(generations: list[Generation]) -> list[Answer]:
    return await _all([Answer().collect(g) for g in generations])


# ---- embeddings --------------------------------------------------------------------------------------------------
@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: fastapi.Request, deps: Deps, tenant: Caller) -> Response:
    """Embeddings of one or more texts, as float lists or base64 float32."""
    timeout = request_timeout(request)
    call = http_call_context(request.headers)
    grpc_request = body.embed_request(cache_mode(request))

    async def run():
        with openai_names(body.param_names()):
            return await embed(deps, grpc_request, tenant=tenant, timeout=timeout, call=call)

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
