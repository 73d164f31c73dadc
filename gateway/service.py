"""The gateway's public gRPC servicers: validate, resolve the model, call the scheduler."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import torch

from moemesh.gateway.caches import DEFAULT_TENANT, GatewayCaches, pack_embedding, unpack_embedding
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.journal import Journal
from moemesh.gateway.ratelimit import RateLimiter, estimate_text_tokens, estimate_tokens
from moemesh.gateway.tenants import OPEN_TENANT, Authenticator, Tenant, credential_from_metadata
from moemesh.gateway.validation import validate_embed_inputs, validate_generate, validate_size
from moemesh.services.core import tensors
from moemesh.services.core.errors import MeshError, error_from_rpc
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    worker_pb2,
)


class StreamClock:
    """Timings of one streamed request, measured at the gateway."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def timings(self, completion_tokens: int) -> common_pb2.Timings:
        end = time.perf_counter()
        first = self.first_token or end
        decode_tokens = max(completion_tokens - 1, 1)
        return common_pb2.Timings(
            time_to_first_token=first - self.start,
            total=end - self.start,
            time_per_output_token=(end - first) / decode_tokens,
        )


audit_log = logging.getLogger("moemesh.audit")


def audit(kind: str, request_id: str, tenant: str, model: str, status: str, started: float, **fields) -> None:
    """One structured record per request (logger `moemesh.audit`): who, what, how much, how long, how it ended."""
    audit_log.info("request", extra={"audit": {
        "kind": kind, "request_id": request_id, "tenant": tenant, "model": model, "status": status,
        "latency_s": round(time.perf_counter() - started, 6), **fields,
    }})


def status_name(exc: BaseException) -> str:
    """The gRPC status name an exception ends a request with."""
    if isinstance(exc, MeshError):
        return exc.grpc_code.name
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "INTERNAL"


class Generation:
    """One validated generation request on its way through the mesh: the model, the work and its events."""

    def __init__(self, request: generation_pb2.GenerateRequest, model: models_pb2.ModelInfo,
                 work: worker_pb2.GenerationWork, client: SchedulerClient, clock: StreamClock,
                 caches: GatewayCaches | None = None, tenant: str = DEFAULT_TENANT) -> None:
        self.request = request
        self.model = model
        self.work = work
        self.client = client
        self.clock = clock
        self.caches = caches
        self.tenant = tenant
        self.audit_prompt: str | None = None  # set when the gateway is configured to audit prompt text
        self.public_id = request.request_id or work.request_id  # the caller's id (the work's is tenant-scoped)
        self.journal: Journal | None = None  # set for a resumable (caller-named) request
        self.journal_key = ""
        self.journal_owner = False

    @property
    def request_id(self) -> str:
        return self.public_id

    async def responses(self) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The response events from `resume_from_index` on; closing early cancels the request upstream."""
        index = 0

        def upstream() -> AsyncIterator[worker_pb2.RequestEvent]:
            if self.caches is None:
                return self.client.generate(self.work)
            return self.caches.events(self.request, self.model, self.tenant, lambda: self.client.generate(self.work))

        if self.journal is not None:
            if self.journal_owner:  # generated in the background into the journal: a disconnect does not stop it
                self.journal.start(self.journal_key, upstream)
            events = self.journal.follow(self.journal_key)
        else:
            events = upstream()
        status, usage, finish = "CANCELLED", common_pb2.Usage(), 0
        try:
            async for event in events:
                if event.token_ids:
                    self.clock.token()
                response = generation_pb2.GenerateResponse(
                    request_id=self.public_id, index=index, text=event.text, token_ids=event.token_ids,
                    logprobs=event.logprobs, model=self.model.id,
                )
                if event.finish_reason:
                    response.finish_reason = event.finish_reason
                    response.usage.CopyFrom(event.usage)
                    response.timings.CopyFrom(self.clock.timings(event.usage.completion_tokens))
                    status, usage, finish = "OK", event.usage, event.finish_reason
                if index >= self.request.resume_from_index:
                    yield response
                index += 1
        except BaseException as exc:
            status = status_name(exc)
            raise
        finally:
            await events.aclose()  # sends the cancel when the caller stopped before the end
            extra = {"prompt": self.audit_prompt} if self.audit_prompt is not None else {}
            audit("generate", self.public_id, self.tenant, self.model.id, status, self.clock.start,
                  prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                  cached_tokens=usage.cached_tokens, response_cache=usage.from_response_cache,
                  finish_reason=common_pb2.FinishReason.Name(finish), **extra)


async def start_generation(request: generation_pb2.GenerateRequest, *, config: GatewayConfig,
                           client: SchedulerClient, catalogue: ModelCatalogue,
                           timeout: float | None, caches: GatewayCaches | None = None,
                           tenant: Tenant = OPEN_TENANT, limiter: RateLimiter | None = None) -> Generation:
    """Resolve the model, check the tenant may use it, validate the request (InvalidRequest naming the field)
    and charge the tenant's rate limits (Overloaded when over); nothing is sent yet.

    The one path from a GenerateRequest to its events, shared by the gRPC servicer and the HTTP API.
    `timeout` is the caller's remaining time in seconds (None: no deadline).
    """
    clock = StreamClock()
    try:
        return await _admit_generation(request, config, client, catalogue, timeout, caches, tenant, limiter, clock)
    except MeshError as exc:
        audit("generate", request.request_id, tenant.id, request.model, status_name(exc), clock.start, error=str(exc))
        raise


async def _admit_generation(request, config, client, catalogue, timeout, caches, tenant, limiter,
                            clock: StreamClock) -> Generation:
    model = await catalogue.resolve(request.model, models_pb2.MODEL_KIND_GENERATION)
    tenant.check_model(model.id)
    validate_generate(request, model, config)
    work = worker_pb2.GenerationWork(
        # A caller's id is unique per tenant only; the mesh-wide one carries the tenant.
        request_id=f"{tenant.id}/{request.request_id}" if request.request_id else uuid.uuid4().hex,
        model=model.id,
        prompt=request.prompt,
        sampling=request.sampling,
        deadline_unix=time.time() + timeout if timeout is not None else 0.0,
        priority=tenant.effective_priority(request.priority),
        tenant=tenant.id,
    )
    journal = caches.journal if caches is not None and request.request_id else None
    key = Journal.key(tenant.id, request.request_id) if journal is not None else ""
    owner = await journal.claim(key) if journal is not None else None
    if limiter is not None and owner is not False:  # following an existing journal costs nothing more
        await limiter.check(tenant, estimate_tokens(work))
    generation = Generation(request, model, work, client, clock, caches, tenant.id)
    if owner is not None:
        generation.journal, generation.journal_key, generation.journal_owner = journal, key, owner
    if config.audit_prompts:
        generation.audit_prompt = request.prompt.text or "\n".join(m.content for m in request.prompt.chat.messages)
    return generation


async def embed(request: embeddings_pb2.EmbedRequest, *, client: SchedulerClient, catalogue: ModelCatalogue,
                timeout: float | None, caches: GatewayCaches | None = None, tenant: Tenant = OPEN_TENANT,
                limiter: RateLimiter | None = None) -> embeddings_pb2.EmbedResponse:
    """Validate an EmbedRequest and embed its inputs (shared by the gRPC servicer and the HTTP API).

    With the embedding cache, inputs found there are not sent upstream; only the rest are embedded.
    """
    started = time.perf_counter()
    try:
        response = await _embed(request, client, catalogue, timeout, caches, tenant, limiter)
    except BaseException as exc:
        audit("embed", request.request_id, tenant.id, request.model, status_name(exc), started,
              inputs=len(request.inputs))
        raise
    audit("embed", response.request_id, tenant.id, response.model, "OK", started, inputs=len(request.inputs),
          prompt_tokens=response.usage.prompt_tokens, cached_tokens=response.usage.cached_tokens)
    return response


async def _embed(request, client, catalogue, timeout, caches, tenant, limiter) -> embeddings_pb2.EmbedResponse:
    model = await catalogue.resolve(request.model, models_pb2.MODEL_KIND_EMBEDDING)
    tenant.check_model(model.id)
    inputs = list(request.inputs)
    validate_embed_inputs(inputs, model)
    if limiter is not None:
        await limiter.check(tenant, estimate_text_tokens(inputs))
    normalize = request.normalize if request.HasField("normalize") else True
    use_cache = caches is not None and request.cache_mode == common_pb2.CACHE_MODE_DEFAULT and model.dimensions > 0
    vectors: list[torch.Tensor | None] = [None] * len(inputs)
    counts = [0] * len(inputs)
    keys: list[str] = []
    if use_cache:
        keys = [caches.embedding_key(model, normalize, text) for text in inputs]
        for i, raw in enumerate(await caches.embeddings.get_many(keys, model.dimensions)):
            if raw is not None:
                vectors[i], counts[i] = unpack_embedding(raw)
    missing = [i for i, v in enumerate(vectors) if v is None]
    if missing:
        work = worker_pb2.EmbedWork(model=model.id, inputs=[inputs[i] for i in missing], normalize=normalize)
        try:
            result = await client.embed(work, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        computed = tensors.from_pb(result.vectors)  # [len(missing), D]
        for row, i in enumerate(missing):
            vectors[i], counts[i] = computed[row], result.token_counts[row]
        if use_cache and request.cache_mode != common_pb2.CACHE_MODE_NO_STORE:
            await caches.embeddings.put_many({keys[i]: pack_embedding(vectors[i], counts[i]) for i in missing})
    matrix = torch.stack(vectors)  # [N, D]
    fresh = set(missing)
    return embeddings_pb2.EmbedResponse(
        request_id=request.request_id or uuid.uuid4().hex,
        model=model.id,
        dimensions=matrix.shape[1],
        embeddings=[embeddings_pb2.Embedding(index=i, values=row) for i, row in enumerate(matrix.tolist())],
        usage=common_pb2.Usage(prompt_tokens=sum(counts),
                               cached_tokens=sum(c for i, c in enumerate(counts) if i not in fresh)),
    )


def tenant_of(context: grpc.aio.ServicerContext, auth: Authenticator) -> Tenant:
    """The caller's tenant from `authorization: Bearer <key or JWT>` (or `x-api-key`) metadata."""
    return auth.authenticate(credential_from_metadata(context.invocation_metadata()))


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, config: GatewayConfig, client: SchedulerClient, catalogue: ModelCatalogue,
                 caches: GatewayCaches | None = None, auth: Authenticator | None = None,
                 limiter: RateLimiter | None = None) -> None:
        self.config = config
        self.client = client
        self.catalogue = catalogue
        self.caches = caches
        self.auth = auth or Authenticator()
        self.limiter = limiter

    async def Generate(self, request, context) -> AsyncIterator[generation_pb2.GenerateResponse]:
        generation = await start_generation(request, config=self.config, client=self.client,
                                            catalogue=self.catalogue, timeout=context.time_remaining(),
                                            caches=self.caches, tenant=tenant_of(context, self.auth),
                                            limiter=self.limiter)
        async for response in generation.responses():
            yield response

    async def Complete(self, request, context) -> generation_pb2.CompleteResponse:
        result = generation_pb2.CompleteResponse()
        texts = []
        async for event in self.Generate(request, context):
            texts.append(event.text)
            result.token_ids.extend(event.token_ids)
            result.logprobs.extend(event.logprobs)
            result.request_id, result.model = event.request_id, event.model
            if event.finish_reason:
                result.finish_reason = event.finish_reason
                result.usage.CopyFrom(event.usage)
                result.timings.CopyFrom(event.timings)
        result.text = "".join(texts)
        return result


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, client: SchedulerClient, catalogue: ModelCatalogue, caches: GatewayCaches | None = None,
                 auth: Authenticator | None = None, limiter: RateLimiter | None = None,
                 config: GatewayConfig | None = None) -> None:
        self.client = client
        self.catalogue = catalogue
        self.caches = caches
        self.auth = auth or Authenticator()
        self.limiter = limiter
        self.config = config

    async def Embed(self, request, context) -> embeddings_pb2.EmbedResponse:
        if self.config is not None:
            validate_size(request, self.config)
        return await embed(request, client=self.client, catalogue=self.catalogue, timeout=context.time_remaining(),
                           caches=self.caches, tenant=tenant_of(context, self.auth), limiter=self.limiter)


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    def __init__(self, catalogue: ModelCatalogue, auth: Authenticator | None = None) -> None:
        self.catalogue = catalogue
        self.auth = auth or Authenticator()

    async def ListModels(self, request, context) -> models_pb2.ListModelsResponse:
        """The served models this caller's tenant may use."""
        tenant = tenant_of(context, self.auth)
        return models_pb2.ListModelsResponse(models=[m for m in await self.catalogue.models() if tenant.allows(m.id)])
