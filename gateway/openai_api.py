"""OpenAI-compatible HTTP routes: /v1/completions, /v1/chat/completions, /v1/embeddings.

Each body becomes the GenerateRequest or EmbedRequest the gRPC API takes and runs through the same shared path
(`service.start_generation`, `service.embed`): the same validation, limits, scheduler calls and errors. Only the
request and response shapes are OpenAI's. Pydantic checks the ranges OpenAI documents; every other limit is the
shared validation's, its field names translated to the OpenAI parameter names.

Deviations from OpenAI: n must be 1; no tools, logit_bias, echo, suffix or best_of; the gateway holds no
tokenizer, so a token in `logprobs` is written "token_id:<id>" (as vLLM's return_tokens_as_token_ids does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar

import fastapi
import grpc
import numpy as np
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from moemesh.gateway.caches import GatewayCaches
from moemesh.gateway.catalogue import ModelCatalogue
from moemesh.gateway.config import GatewayConfig
from moemesh.gateway.ratelimit import RateLimiter
from moemesh.gateway.service import Generation, embed, start_generation
from moemesh.gateway.tenants import Authenticator, Tenant, credential_from_headers
from moemesh.services.core.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    MeshError,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
)
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import common_pb2, embeddings_pb2, generation_pb2

log = logging.getLogger("moemesh.gateway.openai")

T = TypeVar("T")

TIMEOUT_HEADER = "X-Request-Timeout"
# The HTTP layer gives up this long after the deadline it sent upstream, should the mesh not report it.
DEADLINE_GRACE = 1.0
# OpenAI's default max_tokens for /v1/completions; chat leaves it to the model's default.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

INT32_MAX = 2**31 - 1
Int32 = Annotated[int, pydantic.Field(ge=-(2**31), le=INT32_MAX)]
NonNegInt32 = Annotated[int, pydantic.Field(ge=0, le=INT32_MAX)]


# ---- request bodies --------------------------------------------------------------------------------------------
def _string_list(value: Any) -> Any:
    """`stop`: a string, a list of strings, or null."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _one_prompt(value: Any) -> Any:
    """`prompt`: a string or a list of one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) == 1:
            return value[0]
        raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
    raise ValueError("must be a string or a list of one string (token ids are not supported)")


def _embedding_inputs(value: Any) -> Any:
    """`input`: a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a string or a list of strings (token ids are not supported)")


def _message_text(value: Any) -> Any:
    """A chat message's `content`: a string, a list of text parts (joined by newlines), or null."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("must be a string or a list of text parts")


StopList = Annotated[list[str], pydantic.BeforeValidator(_string_list)]


class _Body(pydantic.BaseModel):
    # Unknown fields are ignored (as most OpenAI-compatible servers do); those that would change the answer
    # are declared below and refused when set.
    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions; ranges as OpenAI documents them."""

    model: str | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = pydantic.Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = pydantic.Field(default=None, ge=0.0, le=1.0)
    n: int | None = pydantic.Field(default=None, ge=1, le=128)
    stop: StopList = []
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**64 - 1)
    presence_penalty: float | None = pydantic.Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = pydantic.Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Not in OpenAI's API (vLLM's names): limits checked by the shared validation.
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[Int32] | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("n", f"only n=1 is supported, got {self.n}")
        if self.logit_bias:
            raise InvalidRequest("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options", "is only allowed when stream is true")

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> common_pb2.SamplingParams:
        s = common_pb2.SamplingParams(stop=self.stop, stop_token_ids=self.stop_token_ids or [],
                                      ignore_eos=bool(self.ignore_eos))
        values = {"max_tokens": max_tokens, "logprobs": logprobs, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed,
                  "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "repetition_penalty": self.repetition_penalty}
        for name, value in values.items():
            if value is not None:
                setattr(s, name, value)
        return s

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingBody):
    prompt: Annotated[str, pydantic.BeforeValidator(_one_prompt)]
    logprobs: int | None = pydantic.Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequest("echo", "is not supported")
        if self.suffix:
            raise InvalidRequest("suffix", "is not supported")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of", "only best_of=1 is supported")


class ChatMessage(_Body):
    role: str
    content: Annotated[str, pydantic.BeforeValidator(_message_text)] = ""
    name: str | None = None


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidRequest(name, "tool and function calling are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise InvalidRequest(name, "tool and function calling are not supported")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise InvalidRequest("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "requires logprobs to be true")


class EmbeddingRequest(_Body):
    input: Annotated[list[str], pydantic.BeforeValidator(_embedding_inputs)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = pydantic.Field(default=None, ge=1)
    user: str | None = None


# ---- errors ------------------------------------------------------------------------------------------------------
_ERROR_TYPES: dict[type[MeshError], str] = {
    InvalidRequest: "invalid_request_error",
    NotFound: "not_found_error",
    Unauthenticated: "authentication_error",
    PermissionDenied: "permission_error",
    Overloaded: "rate_limit_error",
    Unavailable: "service_unavailable_error",
    DeadlineExceeded: "timeout_error",
    Cancelled: "cancelled_error",
}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_of(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """HTTP status, OpenAI error object and headers of any exception (500 only for bugs)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        exc = error_from_rpc(exc)
    if not isinstance(exc, MeshError):
        log.error("unhandled error in the HTTP API", exc_info=exc)
        return 500, {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                     "param": None, "code": None}, {}
    type_ = next((name for cls, name in _ERROR_TYPES.items() if isinstance(exc, cls)), "server_error")
    param = exc.field if isinstance(exc, InvalidRequest) else None
    code = "model_not_found" if param == "model" else None
    headers = {}
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after))),
                   "retry-after-ms": str(max(1, round(exc.retry_after * 1000)))}
    elif isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    return exc.http_status, {"message": str(exc), "type": type_, "param": param, "code": code}, headers


def exception_response(exc: BaseException) -> JSONResponse:
    status, error, headers = _error_of(exc)
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    """A body that is not valid JSON or does not fit the request model: 400 naming the first bad field."""
    error = exc.errors()[0] if exc.errors() else {"type": "invalid", "loc": ("body",), "msg": "invalid request"}
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        position = error["loc"][-1] if len(error.get("loc", ())) > 1 else None
        where = f" at position {position}" if isinstance(position, int) else ""
        return error_response(400, f"malformed JSON body{where}: {detail}".rstrip(": "), "invalid_request_error")
    loc = [part for part in error.get("loc", ()) if part != "body"]
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if not param and error.get("type") == "missing":
        message = "a JSON request body is required"
    elif not param and error.get("type") == "model_attributes_type":
        message = "the request body must be a JSON object, sent with Content-Type: application/json"
    return error_response(400, f"{param}: {message}" if param else message, "invalid_request_error", param or None)


def _renamed(exc: InvalidRequest, names: list[tuple[str, str]]) -> InvalidRequest:
    """A shared-validation error (gRPC field names) with the OpenAI parameter name instead."""
    field = exc.field
    message = str(exc).removeprefix(f"{field}: ")
    for prefix, name in names:
        if field == prefix or (field.startswith(prefix) and (prefix.endswith(".") or field[len(prefix)] in ".[")):
            return InvalidRequest(name + field[len(prefix):], message)
    return exc


@contextlib.contextmanager
def _openai_names(names: list[tuple[str, str]]) -> Iterator[None]:
    try:
        yield
    except InvalidRequest as exc:
        raise _renamed(exc, names) from None


# ---- cache control ---------------------------------------------------------------------------------------------
def cache_mode(request: fastapi.Request) -> int:
    """The request's `Cache-Control` header as a cache mode: no-store, no-cache, or the default."""
    directives = {d.strip().lower() for d in request.headers.get("Cache-Control", "").split(",")}
    if "no-store" in directives:
        return common_pb2.CACHE_MODE_NO_STORE
    if "no-cache" in directives:
        return common_pb2.CACHE_MODE_NO_CACHE
    return common_pb2.CACHE_MODE_DEFAULT


# ---- deadlines and disconnects -----------------------------------------------------------------------------------
class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


def request_timeout(request: fastapi.Request) -> float | None:
    """Seconds from the X-Request-Timeout header (None: no deadline)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(TIMEOUT_HEADER, f"must be a positive number of seconds, got {raw!r}")
    return value


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, awaitable: Awaitable[T], timeout: float | None = None) -> T:
    """The result of `awaitable`, cancelled (which cancels its upstream work) when the client disconnects
    (ClientGone) or after `timeout` seconds (DeadlineExceeded)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watcher.cancel()
        await asyncio.wait({task, watcher})
    if task in done:
        return task.result()
    if watcher in done:
        raise ClientGone()
    raise DeadlineExceeded(f"no answer within the {TIMEOUT_HEADER} deadline")


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed (cancelling the generation) when the client goes away."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self.stream_response(send))
        except (ClientGone, OSError):
            log.info("HTTP client disconnected mid-stream")
        finally:
            await self.body_iterator.aclose()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


# ---- response pieces ---------------------------------------------------------------------------------------------
def _finish(reason: int) -> str | MeshError:
    """OpenAI's finish_reason, or the error to return instead: an aborted or expired generation is no answer."""
    if reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_CONTEXT):
        return "length"
    if reason == common_pb2.FINISH_REASON_STOP:
        return "stop"
    if reason == common_pb2.FINISH_REASON_DEADLINE:
        return DeadlineExceeded("the request's deadline passed mid-generation")
    if reason == common_pb2.FINISH_REASON_ABORT:
        return Unavailable("the generation was aborted by the mesh; retry")
    return Unavailable(f"the generation ended without a finish reason ({reason})")


def _finish_reason(reason: int) -> str:
    finish = _finish(reason)
    if isinstance(finish, MeshError):
        raise finish
    return finish


def _usage(usage: common_pb2.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _token(token_id: int) -> str:
    return f"token_id:{token_id}"


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; OpenAI's floor


def _chat_logprobs(logprobs) -> dict:
    return {"content": [
        {"token": _token(lp.token_id), "logprob": _logprob(lp.logprob), "bytes": None,
         "top_logprobs": [{"token": _token(t.token_id), "logprob": _logprob(t.logprob), "bytes": None}
                          for t in lp.top]}
        for lp in logprobs
    ], "refusal": None}


def _completion_logprobs(logprobs) -> dict:
    return {"tokens": [_token(lp.token_id) for lp in logprobs],
            "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
            "top_logprobs": [{_token(t.token_id): _logprob(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": None}


class _Answer:
    """A whole generation collected from its events."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[common_pb2.TokenLogprob] = []
        self.last: generation_pb2.GenerateResponse | None = None

    async def collect(self, generation: Generation) -> _Answer:
        async with contextlib.aclosing(generation.responses()) as events:
            async for event in events:
                self.texts.append(event.text)
                self.logprobs.extend(event.logprobs)
                self.last = event
        if self.last is None or not self.last.finish_reason:
            raise Unavailable("the generation ended without a final event; retry")
        return self

    @property
    def text(self) -> str:
        return "".join(self.texts)


# ---- the routes --------------------------------------------------------------------------------------------------
_COMPLETION_NAMES = [("sampling.", ""), ("prompt.text", "prompt"), ("prompt", "prompt")]
_EMBEDDING_NAMES = [("inputs", "input")]


def _chat_names(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    max_tokens = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    return [("sampling.logprobs", "top_logprobs"), ("sampling.max_tokens", max_tokens), ("sampling.", ""),
            ("prompt.chat.messages", "messages"), ("prompt.chat", "messages"), ("prompt", "messages")]


def tenant_dependency(auth: Authenticator) -> Callable[[fastapi.Request], Tenant]:
    """A FastAPI dependency: the caller's tenant from `Authorization: Bearer <key or JWT>` (or `X-API-Key`).

    Dependencies run before the body is validated, so an unauthenticated caller gets 401 whatever it sent.
    """

    def tenant(request: fastapi.Request) -> Tenant:
        return auth.authenticate(credential_from_headers(request.headers.get("authorization"),
                                                         request.headers.get("x-api-key")))

    return tenant


def register(app: fastapi.FastAPI, *, config: GatewayConfig, client: SchedulerClient,
             catalogue: ModelCatalogue, caches: GatewayCaches | None = None, auth: Authenticator | None = None,
             limiter: RateLimiter | None = None) -> None:
    """Add the OpenAI-compatible routes and error handlers to the gateway's app."""
    caller = fastapi.Depends(tenant_dependency(auth or Authenticator()))  # a default, not Annotated: the
    # module's postponed annotations cannot see a local name

    async def on_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    async def on_invalid_body(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    async def on_http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))

    for cls in (MeshError, grpc.aio.AioRpcError, Exception):
        app.add_exception_handler(cls, on_error)
    app.add_exception_handler(RequestValidationError, on_invalid_body)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)

    async def open_generation(request: fastapi.Request, grpc_request: generation_pb2.GenerateRequest,
                              names: list[tuple[str, str]], timeout: float | None, tenant: Tenant,
                              ) -> tuple[Generation, AsyncIterator[generation_pb2.GenerateResponse],
                                         generation_pb2.GenerateResponse | None]:
        """Validate and start a streamed generation and wait for its first event, so that a refusal
        (invalid, overloaded, unavailable) is still an HTTP error status rather than an event."""

        async def first() -> tuple[Generation, AsyncIterator, generation_pb2.GenerateResponse | None]:
            with _openai_names(names):
                generation = await start_generation(grpc_request, config=config, client=client, caches=caches,
                                                    catalogue=catalogue, timeout=timeout, tenant=tenant,
                                                    limiter=limiter)
                events = generation.responses()
                try:
                    return generation, events, await anext(events, None)
                except BaseException:
                    await events.aclose()
                    raise

        return await until_disconnected(request.receive, first(), _grace(timeout))

    async def complete(request: fastapi.Request, grpc_request: generation_pb2.GenerateRequest,
                       names: list[tuple[str, str]], timeout: float | None,
                       tenant: Tenant) -> tuple[Generation, _Answer]:
        async def run() -> tuple[Generation, _Answer]:
            with _openai_names(names):
                generation = await start_generation(grpc_request, config=config, client=client, caches=caches,
                                                    catalogue=catalogue, timeout=timeout, tenant=tenant,
                                                    limiter=limiter)
                return generation, await _Answer().collect(generation)

        return await until_disconnected(request.receive, run(), _grace(timeout))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: fastapi.Request, tenant: Tenant = caller) -> Response:
        body.check_supported()
        timeout = request_timeout(request)
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        grpc_request = generation_pb2.GenerateRequest(
            model=body.model or "", prompt=common_pb2.Prompt(text=body.prompt),
            sampling=body.sampling(max_tokens, body.logprobs), cache_mode=cache_mode(request))
        created = int(time.time())
        try:
            if body.stream:
                opened = await open_generation(request, grpc_request, _COMPLETION_NAMES, timeout, tenant)
                return _stream(opened, body.include_usage, _CompletionChunks(created, body.logprobs is not None))
            generation, answer = await complete(request, grpc_request, _COMPLETION_NAMES, timeout, tenant)
        except ClientGone:
            return Response(status_code=499)
        choice = {"index": 0, "text": answer.text, "finish_reason": _finish_reason(answer.last.finish_reason),
                  "logprobs": _completion_logprobs(answer.logprobs) if body.logprobs is not None else None}
        return JSONResponse({
            "id": f"cmpl-{generation.request_id}", "object": "text_completion", "created": created,
            "model": generation.model.id, "system_fingerprint": generation.model.revision or None,
            "choices": [choice], "usage": _usage(answer.last.usage),
        }, headers={"X-Request-Id": generation.request_id})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: fastapi.Request, tenant: Tenant = caller) -> Response:
        body.check_supported()
        timeout = request_timeout(request)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        messages = [common_pb2.ChatMessage(role="system" if m.role == "developer" else m.role,
                                           content=m.content, name=m.name or "") for m in body.messages]
        grpc_request = generation_pb2.GenerateRequest(
            model=body.model or "", prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages)),
            sampling=body.sampling(max_tokens, logprobs), cache_mode=cache_mode(request))
        created = int(time.time())
        names = _chat_names(body)
        try:
            if body.stream:
                opened = await open_generation(request, grpc_request, names, timeout, tenant)
                return _stream(opened, body.include_usage, _ChatChunks(created, bool(body.logprobs)))
            generation, answer = await complete(request, grpc_request, names, timeout, tenant)
        except ClientGone:
            return Response(status_code=499)
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                  "finish_reason": _finish_reason(answer.last.finish_reason),
                  "logprobs": _chat_logprobs(answer.logprobs) if body.logprobs else None}
        return JSONResponse({
            "id": f"chatcmpl-{generation.request_id}", "object": "chat.completion", "created": created,
            "model": generation.model.id, "system_fingerprint": generation.model.revision or None,
            "choices": [choice], "usage": _usage(answer.last.usage),
        }, headers={"X-Request-Id": generation.request_id})

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: fastapi.Request, tenant: Tenant = caller) -> Response:
        timeout = request_timeout(request)
        grpc_request = embeddings_pb2.EmbedRequest(model=body.model or "", inputs=body.input,
                                                   cache_mode=cache_mode(request))

        async def run() -> embeddings_pb2.EmbedResponse:
            with _openai_names(_EMBEDDING_NAMES):
                return await embed(grpc_request, client=client, catalogue=catalogue, timeout=timeout, caches=caches,
                                   tenant=tenant, limiter=limiter)

        try:
            result = await until_disconnected(request.receive, run(), _grace(timeout))
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


def _grace(timeout: float | None) -> float | None:
    return None if timeout is None else timeout + DEADLINE_GRACE


def _vector(values, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    return list(values)


# ---- streaming ---------------------------------------------------------------------------------------------------
class _CompletionChunks:
    """`text_completion` chunks: one per event, the finish reason on the last."""

    def __init__(self, created: int, logprobs: bool) -> None:
        self.created, self.logprobs = created, logprobs

    def head(self, generation: Generation) -> dict:
        return {"id": f"cmpl-{generation.request_id}", "object": "text_completion", "created": self.created,
                "model": generation.model.id, "system_fingerprint": generation.model.revision or None}

    def start(self, generation: Generation) -> Iterator[dict]:
        return iter(())

    def event(self, generation: Generation, event: generation_pb2.GenerateResponse) -> Iterator[dict]:
        """The chunks of one event; raises (after the text) when the generation ended without an answer."""
        finish = _finish(event.finish_reason) if event.finish_reason else None
        failed = isinstance(finish, MeshError)
        if event.text or event.token_ids or (finish and not failed):
            choice = {"index": 0, "text": event.text, "finish_reason": None if failed else finish,
                      "logprobs": _completion_logprobs(event.logprobs) if self.logprobs else None}
            yield {**self.head(generation), "choices": [choice]}
        if failed:
            raise finish


class _ChatChunks(_CompletionChunks):
    """`chat.completion.chunk`s: the role first, then content deltas, then an empty delta with the finish."""

    def head(self, generation: Generation) -> dict:
        return {"id": f"chatcmpl-{generation.request_id}", "object": "chat.completion.chunk",
                "created": self.created, "model": generation.model.id,
                "system_fingerprint": generation.model.revision or None}

    def start(self, generation: Generation) -> Iterator[dict]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield {**self.head(generation), "choices": [choice]}

    def event(self, generation: Generation, event: generation_pb2.GenerateResponse) -> Iterator[dict]:
        if event.text or event.token_ids:
            choice = {"index": 0, "delta": {"content": event.text}, "finish_reason": None,
                      "logprobs": _chat_logprobs(event.logprobs) if self.logprobs else None}
            yield {**self.head(generation), "choices": [choice]}
        if event.finish_reason:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(event.finish_reason)}
            yield {**self.head(generation), "choices": [choice]}


def _stream(opened: tuple[Generation, AsyncIterator[generation_pb2.GenerateResponse],
                          generation_pb2.GenerateResponse | None],
            include_usage: bool, chunks: _CompletionChunks) -> EventStream:
    generation, events, first = opened

    async def body() -> AsyncIterator[str]:
        usage = {"usage": None} if include_usage else {}
        try:
            for chunk in chunks.start(generation):
                yield _sse({**chunk, **usage})
            event, last = first, None
            while event is not None:
                for chunk in chunks.event(generation, event):
                    yield _sse({**chunk, **usage})
                last, event = event, await anext(events, None)
            if last is None or not last.finish_reason:
                raise Unavailable("the generation ended without a final event; retry")
            if include_usage:
                yield _sse({**chunks.head(generation), "choices": [], "usage": _usage(last.usage)})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - after the 200 an error can only be an event
            _, error, _ = _error_of(exc)
            yield _sse({"error": error})
        finally:
            await events.aclose()  # cancels the generation upstream if it is still running

    return EventStream(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                        "X-Request-Id": generation.request_id})


class BodyLimit:
    """Refuses a body above the gateway's max_request_bytes (as gRPC does) before it is read: 413."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = error_response(413, f"request body is {int(length)} bytes; the limit is {self.limit}",
                                          "invalid_request_error", code="request_too_large")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
