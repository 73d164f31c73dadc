"""What a benchmark client does, whatever its protocol: find the model, and send one timed request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from moemesh.loadgen.config import Target
from moemesh.loadgen.dataset import Prompt
from moemesh.loadgen.metrics import RequestRecord


@dataclass(frozen=True)
class RequestSpec:
    """The parts of every request that do not depend on its prompt."""

    model: str
    output_tokens: int
    temperature: float
    seed: int
    allow_cache: bool
    timeout: float  # seconds

    def sampling_seed(self, index: int) -> int | None:
        """Each request's own seed when sampling (reproducible, and different requests differ); none when greedy."""
        return self.seed + index if self.temperature > 0 else None


class ModelNotFound(Exception):
    """The server lists no model to generate with, or the list could not be read."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class BenchClient(Protocol):
    """One target's connection: opened with `async with`, shared by every request to that target."""

    target: Target

    async def __aenter__(self) -> BenchClient: ...

    async def __aexit__(self, *exc_info) -> None: ...

    async def default_model(self) -> str:
        """The first generation model the server lists; raises ModelNotFound."""
        ...

    async def send(self, prompt: Prompt, spec: RequestSpec, index: int) -> RequestRecord:
        """Send one streamed request and time it; a failure is a record with its error, never an exception."""
        ...


def open_client(target: Target, api_key: str | None) -> BenchClient:
    """The client for a target's protocol."""
    if target.is_grpc:
        from moemesh.loadgen.grpc_client import GrpcClient

        return GrpcClient(target, api_key)
    from moemesh.loadgen.http_client import HttpClient

    return HttpClient(target, api_key)
