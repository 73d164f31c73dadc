"""The one place where exceptions become gRPC statuses (a server interceptor)."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from moemesh.services.core.errors import MeshError, Overloaded, status_of

log = logging.getLogger(__name__)


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


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = status_of(exc)
    if not isinstance(exc, (MeshError, grpc.aio.AioRpcError)):
        log.exception("unhandled error in %s", method)
    trailing = ()
    if isinstance(exc, Overloaded):  # the retry hint, as HTTP's retry-after-ms header carries it
        trailing = (("retry-after-ms", str(max(1, round(exc.retry_after * 1000)))),)
    await context.abort(code, message, trailing_metadata=trailing)


def _wrap_unary(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    @functools.wraps(behaviour)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise  # the servicer already chose a status
        except Exception as exc:  # noqa: BLE001 - every error gets a status here
            await _abort(context, exc, method)

    return wrapped


def _wrap_stream(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    @functools.wraps(behaviour)
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, context):
                yield item
        except grpc.aio.AbortError:
            raise  # the servicer already chose a status
        except Exception as exc:  # noqa: BLE001 - every error gets a status here
            await _abort(context, exc, method)

    return wrapped
