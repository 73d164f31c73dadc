"""The benchmark client of an OpenAI-compatible server: `POST /v1/completions` with `stream: true`, over httpx.

The body asks for exactly `output_tokens` tokens (`max_tokens` with vLLM's `ignore_eos`, which the mesh takes
too) and for the usage in a last chunk (`stream_options.include_usage`). A chunk carries no token count, so
each chunk with output counts as one token for the inter-token latency; the throughput and TPOT use the usage
the server reports. The mesh sends a chunk per engine step (one token each); a server that sends several tokens
per chunk shows longer, fewer gaps.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from moemesh.loadgen.clients import ModelNotFound, RequestSpec
from moemesh.loadgen.config import Target
from moemesh.loadgen.dataset import Prompt
from moemesh.loadgen.metrics import RequestRecord

MODEL_LIST_TIMEOUT = 10.0  # seconds
DATA_PREFIX = "data:"


class StreamFailed(Exception):
    """The server ended a started stream with an error event, or without `[DONE]`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def completion_body(prompt: Prompt, spec: RequestSpec, index: int) -> dict:
    """The JSON body of one streamed completion."""
    body = {"model": spec.model, "prompt": prompt.text, "max_tokens": spec.output_tokens,
            "temperature": spec.temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    seed = spec.sampling_seed(index)
    if seed is not None:
        body["seed"] = seed
    return body


def chunk_tokens(chunk: dict) -> int:
    """Tokens a completion chunk is counted as: one per choice with output (text, or no finish reason yet)."""
    return sum(1 for choice in chunk.get("choices") or () if choice.get("text") or choice.get("finish_reason") is None)


def error_message(response_text: str) -> str:
    """The message of an OpenAI-shaped error body, else the body itself (cut short)."""
    try:
        return str(json.loads(response_text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response_text[:500]


class HttpClient:
    """Times streamed `/v1/completions` against one OpenAI-compatible target."""

    def __init__(self, target: Target, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.target = target
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = transport  # httpx's own default unless given (tests give a MockTransport)
        self.http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> HttpClient:
        # No connection limit: the load generator, not the client's pool, decides how many requests are in flight.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(base_url=self.target.base_url, headers=self.headers, limits=limits,
                                      transport=self.transport)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.http.aclose()

    async def default_model(self) -> str:
        """The first model `GET /v1/models` lists that is not an embedding model."""
        try:
            response = await self.http.get("/v1/models", timeout=MODEL_LIST_TIMEOUT)
        except httpx.HTTPError as exc:
            raise ModelNotFound(type(exc).__name__, f"GET /v1/models failed: {exc}") from None
        if response.status_code != 200:
            raise ModelNotFound(f"HTTP {response.status_code}", f"GET /v1/models: {error_message(response.text)}")
        for model in response.json().get("data") or ():
            if model.get("kind") != "embedding":
                return model["id"]
        raise ModelNotFound("NO_MODEL", "GET /v1/models lists no generation model")

    async def send(self, prompt: Prompt, spec: RequestSpec, index: int) -> RequestRecord:
        """One streamed completion, timed chunk by chunk."""
        record = RequestRecord()
        headers = {} if spec.allow_cache else {"Cache-Control": "no-store"}
        body = completion_body(prompt, spec, index)
        start = time.perf_counter()
        try:
            async with (asyncio.timeout(spec.timeout),
                        self.http.stream("POST", "/v1/completions", json=body, headers=headers,
                                         timeout=spec.timeout) as response):
                if response.status_code != 200:
                    record.error_kind = f"HTTP {response.status_code}"
                    record.error_message = error_message((await response.aread()).decode(errors="replace"))
                else:
                    await _read_stream(response, record, start)
        except httpx.HTTPError as exc:
            record.error_kind, record.error_message = type(exc).__name__, str(exc) or repr(exc)
        except StreamFailed as exc:
            record.error_kind, record.error_message = exc.kind, str(exc)
        except TimeoutError:  # the whole request's deadline; httpx's own timeouts bound each read
            record.error_kind, record.error_message = "Timeout", f"no complete answer within {spec.timeout:g} s"
        record.e2e = time.perf_counter() - start
        return record


async def _read_stream(response: httpx.Response, record: RequestRecord, start: float) -> None:
    """Read server-sent events up to `[DONE]`, noting when each chunk with output arrived and the usage."""
    # Hand-rolled: the OpenAI stream uses `data:` lines only, so a whole SSE library would parse nothing more.
    async for line in response.aiter_lines():
        if not line.startswith(DATA_PREFIX):
            continue
        data = line[len(DATA_PREFIX):].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise StreamFailed("BadChunk", f"a chunk is not JSON: {data[:200]!r}") from None
        _take_chunk(chunk, record, time.perf_counter() - start)
    raise StreamFailed("IncompleteStream", "the stream ended without data: [DONE]")


def _take_chunk(chunk: dict, record: RequestRecord, elapsed: float) -> None:
    """Note one chunk: its output tokens, the usage, or the error it carries."""
    if "error" in chunk:
        error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
        raise StreamFailed(f"stream error {error.get('code') or error.get('type') or ''}".strip(),
                           str(error.get("message", "")))
    tokens = chunk_tokens(chunk)
    if tokens:
        record.pieces.append((elapsed, tokens))
    usage = chunk.get("usage")
    if usage:
        record.output_tokens = usage.get("completion_tokens")
        record.prompt_tokens = usage.get("prompt_tokens")
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
