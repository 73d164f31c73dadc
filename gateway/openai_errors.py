"""OpenAI-shaped errors: every exception of the HTTP API as {"error": {"message", "type", "param", "code"}}.

One mapping from the mesh's error family (and FastAPI's own body and routing errors) to HTTP statuses, OpenAI
error types and headers (Retry-After, WWW-Authenticate), installed as the app's exception handlers. A message
that names an internal address (a failed call to the scheduler or a worker) is replaced by a generic one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import fastapi
import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    public_message,
)

log = logging.getLogger("moemesh.gateway.openai")

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


def error_of(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
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
    message = public_message(exc.code, str(exc))  # never an internal address, whoever raised it
    return exc.http_status, {"message": message, "type": type_, "param": param, "code": code}, headers


def exception_response(exc: BaseException) -> JSONResponse:
    """Any exception as an OpenAI error response."""
    status, error, headers = error_of(exc)
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
def openai_names(names: list[tuple[str, str]]) -> Iterator[None]:
    """Within the block, a shared-validation error names the OpenAI parameter (see `_renamed`)."""
    try:
        yield
    except InvalidRequest as exc:
        raise _renamed(exc, names) from None


async def _on_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
    return exception_response(exc)


async def _on_invalid_body(request: fastapi.Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_response(exc)


async def _on_http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))


def add_error_handlers(app: fastapi.FastAPI) -> None:
    """Answer every error of the app in OpenAI's shape (500 only for bugs)."""
    for cls in (MeshError, grpc.aio.AioRpcError, Exception):
        app.add_exception_handler(cls, _on_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_body)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
