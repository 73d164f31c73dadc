"""The one place where exceptions become gRPC statuses (a server interceptor, and `status_of`)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from moemesh.services.core.errors import InvalidRequest, MeshError, Overloaded, RateLimited

log = logging.getLogger(__name__)

_STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


def grpc_status_code(code: int) -> grpc.StatusCode:
    """The gRPC status code of a google.rpc.Code number (UNKNOWN for a number gRPC does not define)."""
    return _STATUS_BY_CODE.get(code, grpc.StatusCode.UNKNOWN)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any exception; INTERNAL only for bugs."""
    if isinstance(exc, MeshError):
        return grpc_status_code(exc.code), str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Aborts the call with the status of a domain error; logs anything else as a bug."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method))


def error_details(exc: BaseException) -> list[Any]:
    """google.rpc error details for a domain error: field violations, retry info, quota failure."""
    if isinstance(exc, InvalidRequest):
        rest = str(exc).partition(": ")[2]
        return [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=rest)])]
    if isinstance(exc, Overloaded):
        seconds = max(exc.retry_after, 0.001)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        details = [error_details_pb2.RetryInfo(retry_delay=delay)]
        if isinstance(exc, RateLimited):
            details.append(error_details_pb2.QuotaFailure(violations=[
                error_details_pb2.QuotaFailure.Violation(subject="tenant", description=str(exc))]))
        return details
    return []


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = status_of(exc)
    if not isinstance(exc, (MeshError, grpc.aio.AioRpcError)):
        log.exception("unhandled error in %s", method)
    trailing: tuple = ()
    details = error_details(exc)
    if details:  # rich details (grpc-status-details-bin), for clients that read google.rpc.Status
        packed = []
        for detail in details:
            wrapper = any_pb2.Any()
            wrapper.Pack(detail)
            packed.append(wrapper)
        status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))
        trailing = tuple(status.trailing_metadata)
    if isinstance(exc, Overloaded):  # the retry hint, as HTTP's retry-after-ms header carries it
        trailing += (("retry-after-ms", str(max(1, round(exc.retry_after * 1000)))),)
    await context.abort(code, message, trailing_metadata=trailing)


def _wrap_unary(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    @functools.wraps(behaviour)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise  # the servicer already chose a status
        except Exception as exc:  # every error gets a status here
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behaviour):  # a handler that writes with context.write (health's Watch)
        return _wrap_unary(behaviour, method)

    @functools.wraps(behaviour)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, context):
                yield item
        except grpc.aio.AbortError:
            raise  # the servicer already chose a status
        except Exception as exc:  # every error gets a status here
            await _abort(context, exc, method)

    return wrapped
