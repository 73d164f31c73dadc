"""The benchmark client of the mesh's public gRPC API: `moemesh.v1.Generation/Generate`, streamed.

One `grpc.aio` channel per target carries every request (HTTP/2 streams). Output is counted in tokens per
event (`token_ids`), so the inter-token latency of an event that carries several tokens is spread over them.
"""

from __future__ import annotations

import time

import grpc

from moemesh.loadgen.clients import ModelNotFound, RequestSpec
from moemesh.loadgen.config import Target
from moemesh.loadgen.dataset import Prompt
from moemesh.loadgen.metrics import RequestRecord
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc

MODEL_LIST_TIMEOUT = 10.0  # seconds
# A stream that ends on these finish reasons did not give the answer asked for: an error, by that name.
FAILED_FINISHES = (common_pb2.FINISH_REASON_ABORT, common_pb2.FINISH_REASON_DEADLINE)


def generate_request(prompt: Prompt, spec: RequestSpec, index: int) -> generation_pb2.GenerateRequest:
    """The request for one prompt: exactly `output_tokens` tokens (ignore_eos), past the response cache."""
    sampling = common_pb2.SamplingParams(max_tokens=spec.output_tokens, temperature=spec.temperature,
                                         ignore_eos=True)
    seed = spec.sampling_seed(index)
    if seed is not None:
        sampling.seed = seed
    return generation_pb2.GenerateRequest(
        model=spec.model, prompt=common_pb2.Prompt(text=prompt.text), sampling=sampling,
        cache_mode=common_pb2.CACHE_MODE_DEFAULT if spec.allow_cache else common_pb2.CACHE_MODE_NO_STORE)


class GrpcClient:
    """Times `Generate` streams against one gRPC target."""

    def __init__(self, target: Target, api_key: str | None) -> None:
        self.target = target
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> GrpcClient:
        if self.target.scheme == "grpcs":
            self.channel = grpc.aio.secure_channel(self.target.address, grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.aio.insecure_channel(self.target.address)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.channel.close()

    async def default_model(self) -> str:
        """The first generation model `ListModels` returns."""
        stub = models_pb2_grpc.ModelsStub(self.channel)
        try:
            reply = await stub.ListModels(models_pb2.ListModelsRequest(), timeout=MODEL_LIST_TIMEOUT,
                                          metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise ModelNotFound(exc.code().name, f"ListModels failed: {exc.details()}") from None
        for model in reply.models:
            if model.kind in (models_pb2.MODEL_KIND_GENERATION, models_pb2.MODEL_KIND_UNSPECIFIED):
                return model.id
        raise ModelNotFound("NO_MODEL", "ListModels lists no generation model")

    async def send(self, prompt: Prompt, spec: RequestSpec, index: int) -> RequestRecord:
        """One `Generate` stream, timed event by event."""
        record = RequestRecord()
        stub = generation_pb2_grpc.GenerationStub(self.channel)
        request = generate_request(prompt, spec, index)
        start = time.perf_counter()
        try:
            async for event in stub.Generate(request, timeout=spec.timeout, metadata=self.metadata):
                if event.token_ids:
                    record.pieces.append((time.perf_counter() - start, len(event.token_ids)))
                if event.finish_reason:
                    _finish(record, event)
        except grpc.aio.AioRpcError as exc:
            record.error_kind, record.error_message = exc.code().name, exc.details() or ""
        record.e2e = time.perf_counter() - start
        return record


def _finish(record: RequestRecord, last: generation_pb2.GenerateResponse) -> None:
    """Take the usage of the stream's last event, or its failure."""
    record.output_tokens = last.usage.completion_tokens
    record.prompt_tokens = last.usage.prompt_tokens
    record.cached_tokens = last.usage.cached_tokens
    if last.finish_reason in FAILED_FINISHES:
        record.error_kind = common_pb2.FinishReason.Name(last.finish_reason)
        record.error_message = f"the stream ended with {record.error_kind}"
