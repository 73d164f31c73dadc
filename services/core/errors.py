"""Domain exceptions, each with its canonical status code (google.rpc.Code) and HTTP status.

The engine, the scheduler and the caches raise these without knowing about
gRPC: a status code here is the protocol-neutral number that the contract's
`RequestError.code` carries and that gRPC statuses share. The gRPC edge
(`interceptors.py`) turns them into statuses, the HTTP edge into responses.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

from google.rpc import code_pb2

log = logging.getLogger(__name__)


class MeshError(Exception):
    """Base of the errors a caller can act on."""

    code: int = code_pb2.UNKNOWN  # google.rpc.Code
    http_status = 500


class InvalidRequest(MeshError):
    """The request breaks a documented limit; the message names the field."""

    code = code_pb2.INVALID_ARGUMENT
    http_status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MeshError):
    code = code_pb2.NOT_FOUND
    http_status = 404


class Unauthenticated(MeshError):
    """No valid credential. The message is what the caller sees; `reason` (why it was refused) is for the audit
    log only, so that callers cannot probe which keys or tenants exist."""

    code = code_pb2.UNAUTHENTICATED
    http_status = 401

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class PermissionDenied(MeshError):
    code = code_pb2.PERMISSION_DENIED
    http_status = 403


class Overloaded(MeshError):
    """No capacity now; retry after `retry_after` seconds."""

    code = code_pb2.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    """A tenant's rate limit refused the request (a quota, not the mesh's capacity)."""


class Unavailable(MeshError):
    """No replica can serve the model right now (retryable)."""

    code = code_pb2.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(MeshError):
    code = code_pb2.DEADLINE_EXCEEDED
    http_status = 504


class Cancelled(MeshError):
    code = code_pb2.CANCELLED
    http_status = 499


class InternalError(MeshError):
    """A bug met while handling one request (INTERNAL): that request ends with it, nothing else is affected."""

    code = code_pb2.INTERNAL
    http_status = 500


# google.rpc.Code numbers (as carried in RequestError.code) -> exception class.
_BY_CODE = {
    cls.code: cls
    for cls in (NotFound, Unauthenticated, PermissionDenied, Overloaded, Unavailable, DeadlineExceeded, Cancelled,
                InternalError)
}


# An internal address in a message crossing a hop: gRPC's own connection errors name the peer
# ("ipv4:10.0.0.7:50052: Connection refused"), and so may a service's. Such a message is never passed on.
_ADDRESS = re.compile(r"\b(?:ipv4|ipv6|unix|unix-abstract|dns):|\b\d{1,3}(?:\.\d{1,3}){3}\b"
                      r"|\[[0-9A-Fa-f]*:[0-9A-Fa-f:.]*\]|\b[A-Za-z0-9][\w.-]*:\d{2,5}\b")
_WITHHELD = {
    code_pb2.UNAVAILABLE: "a service of the mesh is unavailable; retry",
    code_pb2.DEADLINE_EXCEEDED: "the request's deadline passed",
    code_pb2.CANCELLED: "the request was cancelled",
}


def public_message(code: int, message: str) -> str:
    """`message`, or a generic one for its status when it names an internal address (host:port, ipv4:..., a
    socket path); the withheld one is logged, for operators."""
    if not _ADDRESS.search(message):
        return message
    log.warning("an upstream error's message was withheld from the caller (it names an internal address)",
                extra={"code": code_name(code),
                       "upstream_message": message})
    return _WITHHELD.get(code, "the mesh failed to serve the request")


def code_name(code: int) -> str:
    """The name of a google.rpc.Code number ("UNKNOWN" for a number it does not define)."""
    return code_pb2.Code.Name(code) if code in code_pb2.Code.values() else "UNKNOWN"


def error_from_code(code: int, message: str, retry_after: float = 0.0) -> MeshError:
    """Rebuild a domain error from a status code number sent across a hop (its message without internal
    addresses: see `public_message`)."""
    message = public_message(code, message)
    if code == code_pb2.INVALID_ARGUMENT:
        field, _, rest = message.partition(": ")
        return InvalidRequest(field, rest or message)
    cls = _BY_CODE.get(code)
    if cls is Overloaded:
        return Overloaded(message, retry_after=retry_after or 1.0)
    return cls(message) if cls else MeshError(message)


class FailedCall(Protocol):
    """What a failed gRPC call (grpc.aio.AioRpcError) tells: its status code and details."""

    def code(self): ...

    def details(self) -> str | None: ...


def error_from_rpc(exc: FailedCall) -> MeshError:
    """A failed call to another service, as the domain error to pass on."""
    return error_from_code(exc.code().value[0], exc.details() or exc.code().name)
