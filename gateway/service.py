"""The gateway's public gRPC servicers: authenticate the caller, then run the shared generation or embedding path.

A failed call to the scheduler leaves here as the domain error `error_from_rpc` makes of it, whose message never
carries an internal address (the raw gRPC details are logged, not forwarded).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc

from moemesh.gateway.calls import grpc_call_context
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.embedding import embed
from moemesh.gateway.generation import start_generation
from moemesh.gateway.tenants import Tenant, credential_from_metadata
from moemesh.gateway.validation import validate_size
from moemesh.services.core.errors import Unauthenticated, error_from_rpc
from moemesh.services.core.server import GrpcServer
from moemesh.services.core.tracing import span
from moemesh.v1 import (
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)


def tenant_of(context: grpc.aio.ServicerContext, deps: GatewayDeps, method: str) -> Tenant:
    """The caller's tenant from `authorization: Bearer <key or JWT>` (or `x-api-key`) metadata; a refusal is
    audited with its reason."""
    try:
        with span("auth"):
            return deps.auth.authenticate(credential_from_metadata(context.invocation_metadata()))
    except Unauthenticated as exc:
        deps.audit.refused(exc, transport="grpc", method=method, peer=context.peer())
        raise


@contextlib.contextmanager
def upstream_errors() -> Iterator[None]:
    """Within the block, a failed call to the scheduler becomes its domain error (no internal address in it)."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from None


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Generate (streamed) and Complete (the whole answer), both through `start_generation`."""

    def __init__(self, deps: GatewayDeps) -> None:
        self.deps = deps

    async def Generate(self, request, context) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The generation's events as they come."""
        tenant = tenant_of(context, self.deps, "Generate")
        call = grpc_call_context(context.invocation_metadata())
        with upstream_errors():
            generation = await start_generation(self.deps, request, tenant=tenant, timeout=context.time_remaining(),
                                                call=call)
            async for response in generation.responses():
                yield response

    async def Complete(self, request, context) -> generation_pb2.CompleteResponse:
        """The whole answer: Generate's events joined."""
        result = generation_pb2.CompleteResponse()
        texts = []
        async for event in self.Generate(request, context):
            texts.append(event.text)
            result.token_ids.extend(event.token_ids)
            result.logprobs.extend(event.logprobs)
            result.prompt_logprobs.extend(event.prompt_logprobs)
            result.request_id, result.model = event.request_id, event.model
            if event.finish_reason:
                result.finish_reason = event.finish_reason
                result.usage.CopyFrom(event.usage)
                result.timings.CopyFrom(event.timings)
        result.text = "".join(texts)
        return result


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    """Embed, through the shared embedding path."""

    def __init__(self, deps: GatewayDeps) -> None:
        self.deps = deps

    async def Embed(self, request, context) -> embeddings_pb2.EmbedResponse:
        """The inputs' embeddings."""
        validate_size(request, self.deps.config)
        tenant = tenant_of(context, self.deps, "Embed")
        call = grpc_call_context(context.invocation_metadata())
        with upstream_errors():
            return await embed(self.deps, request, tenant=tenant, timeout=context.time_remaining(), call=call)


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    """ListModels: the served models a caller may use."""

    def __init__(self, deps: GatewayDeps) -> None:
        self.deps = deps

    async def ListModels(self, request, context) -> models_pb2.ListModelsResponse:
        """The served models this caller's tenant may use."""
        tenant = tenant_of(context, self.deps, "ListModels")
        with upstream_errors():
            return models_pb2.ListModelsResponse(models=await self.deps.catalogue.visible_to(tenant))


def add_servicers(server: GrpcServer, deps: GatewayDeps) -> None:
    """Register the gateway's public services (Generation, Embeddings, Models) on the server."""
    for module, name, add, servicer in (
        (generation_pb2, "Generation", generation_pb2_grpc.add_GenerationServicer_to_server, GenerationServicer),
        (embeddings_pb2, "Embeddings", embeddings_pb2_grpc.add_EmbeddingsServicer_to_server, EmbeddingsServicer),
        (models_pb2, "Models", models_pb2_grpc.add_ModelsServicer_to_server, ModelsServicer),
    ):
        server.add(add, servicer(deps), module.DESCRIPTOR.services_by_name[name].full_name)
