"""The worker's gRPC servicer: converts protobuf and calls the engine runner.

One Execute stream carries many requests (the scheduler's link), so nothing
one request does may end it: a refusal, a bug met while admitting it or
while converting its output, is that request's error event, and the stream
goes on serving the others. When the engine fails, every stream's in-flight
requests get UNAVAILABLE and the streams end (see runner.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from moemesh.services.core import tensors
from moemesh.services.core.errors import InternalError, InvalidRequest, MeshError, NotFound, Unavailable, code_name
from moemesh.services.core.logs import request_fields
from moemesh.services.core.tracing import NO_TRACE, RequestTrace, request_trace
from moemesh.v1 import worker_pb2, worker_pb2_grpc
from moemesh.worker.embeddings.sentence import EmbeddingJob, EmbeddingModel
from moemesh.worker.engine.requests import RequestOutput
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.server.convert import output_to_pb, request_from_pb
from moemesh.worker.server.runner import EngineRunner, Subscriber

log = logging.getLogger(__name__)


def coalesce(batch: worker_pb2.EventBatch, outbox: asyncio.Queue) -> worker_pb2.EventBatch:
    """`batch` plus every batch already waiting behind it, as one message (a slow reader gets fewer, fuller ones)."""
    while not outbox.empty():
        following = outbox.get_nowait()
        if following is None:
            outbox.put_nowait(None)  # the end stays the end
            break
        batch.events.extend(following.events)
    return batch


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Execute streams feed the engine; Embed runs the embedding model off the loop."""

    def __init__(
        self,
        runner: EngineRunner,
        tokenizer: Tokenizer,
        model_id: str,
        generation_defaults: dict,
        embedders: dict[str, EmbeddingModel],
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.generation_defaults = generation_defaults
        self.embedders = embedders
        self.draining = False
        self.traces: dict[str, RequestTrace] = {}  # request id -> its span here (tracing on only)
        self.decoding: set[str] = set()  # traced requests past their first token
        self.log_fields: dict[str, dict] = {}  # request id -> its ids for the log line at its end (debug level)

    async def Execute(
        self, request_iterator: AsyncIterator[worker_pb2.ExecuteRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.EventBatch]:
        outbox: asyncio.Queue[worker_pb2.EventBatch] = asyncio.Queue()
        mine: set[str] = set()
        subscriber = self._subscriber(mine, outbox)
        reader = asyncio.create_task(self._read(request_iterator, subscriber, mine, outbox))
        # After an engine failure, once the in-flight requests got their UNAVAILABLE, the stream ends.
        failed = asyncio.create_task(self.runner.in_flight_failed.wait())
        failed.add_done_callback(lambda task: task.cancelled() or outbox.put_nowait(None))
        try:
            while True:
                batch = await outbox.get()
                if batch is None:
                    return
                yield coalesce(batch, outbox)
        finally:
            reader.cancel()
            failed.cancel()
            for request_id in mine:  # the scheduler went away: free their slots
                self.runner.abort(request_id, "abort")

    def _subscriber(self, mine: set[str], outbox: asyncio.Queue) -> Subscriber:
        """Where the engine's outputs and errors of one stream's requests go."""
        given_up: set[str] = set()  # ended by a conversion error: their later outputs are dropped

        def deliver(outputs: list[RequestOutput]) -> None:
            events = []
            for output in outputs:
                if output.request_id in given_up:
                    if output.finish_reason is not None:
                        given_up.discard(output.request_id)
                    continue
                if output.finish_reason is not None:
                    mine.discard(output.request_id)
                if self.traces:
                    self._trace_output(output)
                if output.finish_reason is not None and self.log_fields:
                    self._log_end(output)
                events.append(self._event(output, mine, given_up))
            if events:
                outbox.put_nowait(worker_pb2.EventBatch(events=events))

        def fail(request_id: str, error: MeshError) -> None:
            mine.discard(request_id)
            self.log_fields.pop(request_id, None)
            trace = self.traces.pop(request_id, None)
            if trace is not None:
                self.decoding.discard(request_id)
                trace.end(error=code_name(error.code))
            outbox.put_nowait(worker_pb2.EventBatch(events=[_error_event(request_id, error)]))

        return Subscriber(deliver, fail)

    def _event(self, output: RequestOutput, mine: set[str], given_up: set[str]) -> worker_pb2.RequestEvent:
        """The output as an event; a conversion bug ends that request alone (INTERNAL) and stops its generation."""
        try:
            return output_to_pb(output, self.tokenizer)
        except Exception as exc:
            log.exception("converting the output of request %s failed", output.request_id,
                          extra={"request_id": output.request_id})
            if output.finish_reason is None:
                mine.discard(output.request_id)
                given_up.add(output.request_id)
                self.runner.abort(output.request_id, "abort")
            return _error_event(output.request_id, InternalError(f"internal error: its output could not be "
                                                                 f"encoded ({type(exc).__name__})"))

    async def _read(self, request_iterator, subscriber: Subscriber, mine: set[str], outbox: asyncio.Queue) -> None:
        compiling: dict[str, asyncio.Task] = {}  # structured requests waiting for their grammar
        try:
            async for message in request_iterator:
                self._handle(message, subscriber, mine, outbox, compiling)
        finally:
            for task in compiling.values():
                task.cancel()
            outbox.put_nowait(None)  # the scheduler closed its side (or its stream broke)

    def _handle(self, message: worker_pb2.ExecuteRequest, subscriber: Subscriber, mine: set[str],
                outbox: asyncio.Queue, compiling: dict[str, asyncio.Task]) -> None:
        """One add or cancel of the stream."""
        if message.WhichOneof("kind") == "cancel":
            task = compiling.pop(message.cancel.request_id, None)
            if task is not None:
                task.cancel()
            self.runner.abort(message.cancel.request_id, "abort")
            return
        work = message.add
        if work.sampling.HasField("structured"):  # compiled on a thread: nobody else waits for it
            task = asyncio.create_task(self._submit_structured(work, subscriber, mine, outbox))
            compiling[work.request_id] = task
            task.add_done_callback(lambda _, rid=work.request_id: compiling.pop(rid, None))
            return
        self._accept(work, self._submit(work, subscriber), mine, outbox)

    @staticmethod
    def _accept(work: worker_pb2.GenerationWork, error: worker_pb2.RequestEvent | None, mine: set[str],
                outbox: asyncio.Queue) -> None:
        if error is None:
            mine.add(work.request_id)
        else:
            outbox.put_nowait(worker_pb2.EventBatch(events=[error]))

    async def _submit_structured(self, work: worker_pb2.GenerationWork, subscriber: Subscriber, mine: set[str],
                                 outbox: asyncio.Queue) -> None:
        """Compile the request's grammar (cached by text), then hand it to the engine like any other."""
        try:
            grammar = await asyncio.to_thread(self.runner.engine.grammars.compile_spec, work.sampling.structured)
        except MeshError as exc:
            self._accept(work, _error_event(work.request_id, exc), mine, outbox)
            return
        except Exception as exc:
            log.exception("compiling the grammar of request %s failed", work.request_id,
                          extra=request_fields(work.client_request_id or work.request_id, work.trace_context))
            error = InternalError(f"internal error: its grammar could not be compiled ({type(exc).__name__})")
            self._accept(work, _error_event(work.request_id, error), mine, outbox)
            return
        self._accept(work, self._submit(work, subscriber, grammar), mine, outbox)

    def _submit(self, work: worker_pb2.GenerationWork, subscriber: Subscriber,
                grammar=None) -> worker_pb2.RequestEvent | None:
        """Hand one request to the engine; a refusal, or a bug met on the way, becomes that request's error event."""
        try:
            if self.draining:
                raise Unavailable("worker is draining")
            if work.model and work.model != self.model_id:
                raise NotFound(f"model {work.model!r} is not served by this worker")
            request = request_from_pb(work, self.tokenizer, self.generation_defaults, grammar)
            trace = request_trace("generate", work.trace_context, {
                "moemesh.request_id": work.client_request_id or work.request_id, "moemesh.model": work.model,
                "moemesh.prompt_tokens": len(request.prompt_token_ids),
                "moemesh.resumed_tokens": len(work.resume_token_ids)})
            self.runner.submit(request, subscriber)
            if trace is not NO_TRACE:
                trace.phase("prefill")  # waiting for a slot, then the prompt's forward passes
                self.traces[work.request_id] = trace
            if log.isEnabledFor(logging.DEBUG):
                self.log_fields[work.request_id] = request_fields(work.client_request_id or work.request_id,
                                                                  work.trace_context)
        except MeshError as exc:
            return _error_event(work.request_id, exc)
        except ValueError as exc:  # the chat template refused the messages, or a tool call's arguments
            return _error_event(work.request_id, InvalidRequest("prompt", str(exc)))
        except Exception as exc:  # a bug: this request's INTERNAL error, the stream serves on
            log.exception("admitting request %s failed", work.request_id,
                          extra=request_fields(work.client_request_id or work.request_id, work.trace_context))
            return _error_event(work.request_id, InternalError(f"internal error: {type(exc).__name__}"))
        return None

    def _trace_output(self, output: RequestOutput) -> None:
        """Move the request's span on: the first token ends its prefill, the finish ends it."""
        trace = self.traces.get(output.request_id)
        if trace is None:
            return
        if output.token_ids and output.request_id not in self.decoding:
            self.decoding.add(output.request_id)
            trace.event("first token")
            trace.phase("decode")
        if output.finish_reason is not None:
            del self.traces[output.request_id]
            self.decoding.discard(output.request_id)
            trace.end({"moemesh.prompt_tokens": output.prompt_tokens,
                       "moemesh.completion_tokens": output.completion_tokens,
                       "moemesh.cached_tokens": output.cached_tokens, "moemesh.finish_reason": output.finish_reason})

    def _log_end(self, output: RequestOutput) -> None:
        fields = self.log_fields.pop(output.request_id, None)
        if fields is not None:
            log.debug("request finished", extra={**fields, "finish_reason": output.finish_reason,
                                                 "prompt_tokens": output.prompt_tokens,
                                                 "completion_tokens": output.completion_tokens,
                                                 "cached_tokens": output.cached_tokens})

    async def Embed(self, request: worker_pb2.EmbedWork, context: grpc.aio.ServicerContext) -> worker_pb2.EmbedResult:
        default = next(iter(self.embedders.values()), None)
        embedder = self.embedders.get(request.model) if request.model else default
        if embedder is None:
            raise NotFound(f"embedding model {request.model!r} is not served by this worker")
        if not request.inputs:
            raise InvalidRequest("inputs", "at least one input is required")
        job = EmbeddingJob(embedder, list(request.inputs), request.normalize)  # checks the inputs
        # Each step on the engine thread (the process's one tensor-computing thread, see runner.py), one between two
        # engine steps: a large batch delays the generating streams by one forward call at a time.
        while await self.runner.call(job.step):
            pass
        vectors, counts = job.result()
        return worker_pb2.EmbedResult(vectors=tensors.to_pb(vectors), token_counts=counts)


def _error_event(request_id: str, exc: MeshError) -> worker_pb2.RequestEvent:
    return worker_pb2.RequestEvent(request_id=request_id,
                                   error=worker_pb2.RequestError(code=exc.code, message=str(exc)))

