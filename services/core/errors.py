"""Domain exceptions and their one mapping to gRPC status codes and HTTP codes."""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class MeshError(Exception):
    """Base of the errors a caller can act on."""

    grpc_code = grpc.StatusCode.UNKNOWN
    http_status = 500


class InvalidRequest(MeshError):
    """The request breaks a documented limit; the message names the field."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unauthenticated(MeshError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(MeshError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Overloaded(MeshError):
    """No capacity now; retry after `retry_after` seconds."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(MeshError):
    """No replica can serve the model right now (retryable)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(MeshError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(MeshError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499


# google.rpc.Code numbers (as carried in RequestError.code) -> exception class.
_BY_CODE = {
    cls.grpc_code.value[0]: cls
    for cls in (NotFound, Unauthenticated, PermissionDenied, Overloaded, Unavailable, DeadlineExceeded, Cancelled)
}


def error_from_code(code: int, message: str, retry_after: float = 0.0) -> MeshError:
    """Rebuild a domain error from a status code number sent across a hop."""
    if code == grpc.StatusCode.INVALID_ARGUMENT.value[0]:
        field, _, rest = message.partition(": ")
        return InvalidRequest(field, rest or message)
    cls = _BY_CODE.get(code)
    if cls is Overloaded:
        return Overloaded(message, retry_after=retry_after or 1.0)
    return cls(message) if cls else MeshError(message)


def error_from_rpc(exc: grpc.aio.AioRpcError) -> MeshError:
    """A failed call to another service, as the domain error to pass on."""
    return error_from_code(exc.code().value[0], exc.details() or exc.code().name)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any exception; INTERNAL only for bugs."""
    if isinstance(exc, MeshError):
        return exc.grpc_code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"
