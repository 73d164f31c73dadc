"""The one generation path, shared by gRPC `Generate`/`Complete` and the OpenAI completions and chat routes.

`start_generation` resolves the model, authorizes the tenant, validates the request, claims its journal (a
resumable request) and charges the rate limits; nothing is sent yet. `Generation.responses` then streams its
events: through the response cache when it may, dispatched to the scheduler on a miss, through the journal when
resumable, and writes the request's audit record when it ends. The tokens charged up front (an estimate) are
settled against the usage the generation reports when it finishes (`Quota`).

A call that follows another call's journal (the same tenant and request id) is charged one request against the
tenant's rate limit, as any stream is, but no tokens: the generation it reads was charged once.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import quote

from moemesh.gateway.audit import status_name
from moemesh.gateway.calls import NO_CALL_CONTEXT, CallContext
from moemesh.gateway.deps import GatewayDeps
from moemesh.gateway.journal import Journal
from moemesh.gateway.ratelimit import RateLimiter, estimate_tokens
from moemesh.gateway.tenants import OPEN_TENANT, Tenant, cache_scope
from moemesh.gateway.validation import validate_generate
from moemesh.services.core.errors import InvalidRequest, MeshError
from moemesh.services.core.logs import bind_request
from moemesh.services.core.tracing import span
from moemesh.v1 import common_pb2, generation_pb2, models_pb2, worker_pb2


class StreamClock:
    """Timings of one streamed request, measured at the gateway."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_token: float | None = None

    def token(self) -> None:
        """Note a token's arrival (the first one sets the time to first token)."""
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def timings(self, completion_tokens: int) -> common_pb2.Timings:
        """The request's timings as it ends with `completion_tokens` generated."""
        end = time.perf_counter()
        first = self.first_token or end
        decode_tokens = max(completion_tokens - 1, 1)
        return common_pb2.Timings(
            time_to_first_token=first - self.start,
            total=end - self.start,
            time_per_output_token=(end - first) / decode_tokens,
        )


@dataclass(frozen=True)
class JournalClaim:
    """A resumable request's journal, and whether this call generates into it or follows another call's."""

    journal: Journal
    key: str
    owner: bool

    def events(self, upstream) -> AsyncIterator[worker_pb2.RequestEvent]:
        """The journaled events; the owner first starts generating into the journal in the background, so that
        a disconnect does not stop it (a reconnect may want the rest)."""
        if self.owner:
            self.journal.start(self.key, upstream)
        return self.journal.follow(self.key)


@dataclass(frozen=True)
class Quota:
    """The tokens a request was charged up front, to be settled against its real usage when it finishes."""

    limiter: RateLimiter
    tenant: Tenant
    charged: int

    async def metered(self, events: AsyncIterator[worker_pb2.RequestEvent]
                      ) -> AsyncIterator[worker_pb2.RequestEvent]:
        """`events`, settling the charge with the finish event's usage (prompt + completion tokens) before it is
        passed on. A stream that ends without one (error, cancel) keeps the up-front charge."""
        async with contextlib.aclosing(events):
            async for event in events:
                if event.finish_reason:
                    used = event.usage.prompt_tokens + event.usage.completion_tokens
                    await self.limiter.settle(self.tenant, self.charged, used)
                yield event


class Generation:
    """One admitted generation request on its way through the mesh: the model, the work and its events."""

    def __init__(self, deps: GatewayDeps, request: generation_pb2.GenerateRequest, model: models_pb2.ModelInfo,
                 work: worker_pb2.GenerationWork, tenant: str, clock: StreamClock,
                 journal: JournalClaim | None = None, quota: Quota | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.deps = deps
        self.request = request
        self.model = model
        self.work = work
        self.tenant = tenant
        self.clock = clock
        self.journal = journal  # set for a resumable (caller-named) request
        self.quota = quota  # set when the tenant has a tokens limit and this call generates
        self.public_id = work.client_request_id  # the caller's id (the work's is tenant-scoped)
        self._release = release  # ends this request's count against its tenant's concurrency limit

    def close(self) -> None:
        """The request is over for its tenant's concurrency limit (idempotent): when its events end, and for a
        generation whose events were never read (another choice of its request was refused)."""
        if self._release is not None:
            self._release()

    @property
    def request_id(self) -> str:
        """The id the caller knows the request by."""
        return self.public_id

    def _upstream(self) -> AsyncIterator[worker_pb2.RequestEvent]:
        """The work's events (metered when charged): from the scheduler, through the response cache if any."""
        events = self._generate()
        return self.quota.metered(events) if self.quota is not None else events

    def _generate(self) -> AsyncIterator[worker_pb2.RequestEvent]:
        client, caches = self.deps.client, self.deps.caches
        if caches is None:
            return client.generate(self.work)
        return caches.events(self.request, self.model, self.work.cache_scope, lambda: client.generate(self.work))

    async def responses(self) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """The response events from `resume_from_index` on; closing early cancels the request upstream."""
        index = 0
        events = self.journal.events(self._upstream) if self.journal is not None else self._upstream()
        status, usage, finish = "CANCELLED", common_pb2.Usage(), 0
        try:
            async for event in events:
                if event.token_ids:
                    self.clock.token()
                response = generation_pb2.GenerateResponse(
                    request_id=self.public_id, index=index, text=event.text, token_ids=event.token_ids,
                    logprobs=event.logprobs, model=self.model.id, prompt_logprobs=event.prompt_logprobs,
                )
                if event.finish_reason:
                    response.finish_reason = event.finish_reason
                    response.usage.CopyFrom(event.usage)
                    response.timings.CopyFrom(self.clock.timings(event.usage.completion_tokens))
                    status, usage, finish = "OK", event.usage, event.finish_reason
                    self.deps.request_metrics.observe(self.model.id, event.usage, response.timings)
                if index >= self.request.resume_from_index:
                    yield response
                index += 1
            if self.request.resume_from_index > index:  # `index` events: the caller could not have seen more
                raise InvalidRequest("resume_from_index", f"{self.request.resume_from_index} is past the end of the "
                                                          f"stream, which has {index} events")
        except BaseException as exc:
            status = status_name(exc)
            raise
        finally:
            try:
                await events.aclose()  # sends the cancel when the caller stopped before the end
            finally:
                self.close()
                self._audit(status, usage, finish)

    def _audit(self, status: str, usage: common_pb2.Usage, finish: int) -> None:
        audit = self.deps.audit
        audit.record("generate", self.public_id, self.tenant, self.model.id, status, self.clock.start,
                     prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                     cached_tokens=usage.cached_tokens, response_cache=usage.from_response_cache,
                     finish_reason=common_pb2.FinishReason.Name(finish), **audit.prompt_fields(self.request))


async def start_generation(deps: GatewayDeps, request: generation_pb2.GenerateRequest, *,
                           tenant: Tenant = OPEN_TENANT, timeout: float | None = None,
                           call: CallContext = NO_CALL_CONTEXT) -> Generation:
    """Resolve the model, check the tenant may use it, validate the request (InvalidRequest naming the field)
    and charge the tenant's rate limits (Overloaded when over); nothing is sent yet.

    The one path from a GenerateRequest to its events, shared by the gRPC servicer and the HTTP API.
    `timeout` is the caller's remaining time in seconds (None: no deadline); `call` what the transport tells of
    the caller (its X-Request-Id and trace context).
    """
    clock = StreamClock()
    try:
        with span("admit"):
            return await _admit(deps, request, tenant, timeout, clock, call)
    except MeshError as exc:
        deps.audit.record("generate", request.request_id or call.request_id, tenant.id, request.model,
                          status_name(exc), clock.start, error=str(exc))
        raise


async def _admit(deps: GatewayDeps, request: generation_pb2.GenerateRequest, tenant: Tenant,
                 timeout: float | None, clock: StreamClock, call: CallContext) -> Generation:
    model = await deps.catalogue.resolve(request.model, models_pb2.MODEL_KIND_GENERATION, tenant)
    tenant.check_model(model.id)
    validate_generate(request, model, deps.config)
    work = _work(request, model, tenant, timeout, call)
    bind_request(work.client_request_id, work.trace_context)  # this call's log lines name the request
    work.cache_scope = cache_scope(tenant, deps.config.cache_shared_scope)  # salts prefix KV too, not just answers
    journal = await _claim_journal(deps.journal, tenant, request, model.id)
    quota, release = None, None
    try:
        release = deps.in_flight.acquire(tenant)  # before any charge: a refusal here costs the tenant nothing
        if deps.limiter is not None:
            generates = journal is None or journal.owner  # a follower reads a generation charged once: a request
            charged = await deps.limiter.check(tenant, estimate_tokens(work) if generates else 0)
            if generates and tenant.tokens_per_minute is not None:
                quota = Quota(deps.limiter, tenant, charged)
    except BaseException:
        if release is not None:
            release()
        if journal is not None and journal.owner:  # refused: nothing will generate, so free the id at once
            await journal.journal.release(journal.key)
        raise
    return Generation(deps, request, model, work, tenant.id, clock, journal, quota, release)


def _work(request: generation_pb2.GenerateRequest, model: models_pb2.ModelInfo, tenant: Tenant,
          timeout: float | None, call: CallContext) -> worker_pb2.GenerationWork:
    work = worker_pb2.GenerationWork(
        # A caller's id is unique per tenant only; the mesh-wide one carries the tenant (both encoded: no two pairs
        # meet, whatever separators they hold).
        request_id=f"{quote(tenant.id, safe='')}/{quote(request.request_id, safe='')}" if request.request_id
        else uuid.uuid4().hex,
        model=model.id,
        prompt=request.prompt,
        sampling=request.sampling,
        deadline_unix=time.time() + timeout if timeout is not None else 0.0,
        priority=tenant.effective_priority(request.priority),
        tenant=tenant.id,
        trace_context=call.trace,  # replaced by the dispatch span's context when tracing is on
    )
    work.client_request_id = request.request_id or call.request_id or work.request_id
    return work


async def _claim_journal(journal: Journal | None, tenant: Tenant, request: generation_pb2.GenerateRequest,
                         model_id: str) -> JournalClaim | None:
    """The journal of a request that names its own id (None: unnamed, no journal, or Redis away); InvalidRequest
    naming `request_id` if the id's journal holds another request."""
    if journal is None or not request.request_id:
        return None
    key = Journal.key(tenant.id, request.request_id)
    owner = await journal.claim(key, fingerprint(request, model_id))
    return JournalClaim(journal, key, owner) if owner is not None else None


def fingerprint(request: generation_pb2.GenerateRequest, model_id: str) -> str:
    """What a request generates: its model, prompt and sampling (not its id, resume index, priority or cache mode,
    which a retry or a resume may change), as 32 hex digits."""
    what = generation_pb2.GenerateRequest(model=model_id, prompt=request.prompt, sampling=request.sampling)
    return hashlib.sha256(what.SerializeToString(deterministic=True)).hexdigest()[:32]
