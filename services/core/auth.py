"""Who may call the internal plane: a server interceptor checking every method's caller before its handler runs.

Two credentials, each checked when it is configured (both when both are):

- the **cluster token**, one secret per mesh, presented as the metadata
  `authorization: Bearer <token>` and compared in constant time; a call
  without it, or with another one, is refused with UNAUTHENTICATED;
- **mutual TLS**, where the TLS handshake already proved the peer holds a
  certificate of the mesh's CA; here its role (`tls.certificate_role`) must
  be one the method accepts (`SCHEDULER_ACCESS`, `WORKER_ACCESS`), else
  PERMISSION_DENIED. A method missing from its service's table accepts no
  role: new methods are closed until someone says who needs them.

It runs inside the error-mapping interceptor (`GrpcServer(interceptors=...)`
puts it there), which turns its refusals into statuses like any domain error.
The standard health service and server reflection stay open: probes and
`grpcurl list` carry no credential and reveal nothing about the mesh.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from moemesh.services.core.errors import PermissionDenied, Unauthenticated
from moemesh.services.core.tls import certificate_role

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                  "/grpc.reflection.v1.ServerReflection/")

# Method name -> the certificate roles that may call it (with mutual TLS).
SCHEDULER_ACCESS: dict[str, frozenset[str]] = {
    "Register": frozenset({"worker"}),
    "Heartbeat": frozenset({"worker"}),
    "Deregister": frozenset({"worker"}),
    "Dispatch": frozenset({"gateway"}),
    "Embed": frozenset({"gateway"}),
    "ListModels": frozenset({"gateway"}),
    "ListNodes": frozenset({"gateway", "operator"}),  # operators inspect the registry too
}
WORKER_ACCESS: dict[str, frozenset[str]] = {
    "Execute": frozenset({"scheduler"}),
    "Embed": frozenset({"scheduler"}),
}


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token` (none when there is no token)."""
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


class ClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call whose caller lacks the configured credentials, before the handler sees a message.

    `access` maps each service's full name (`moemesh.v1.Scheduler`) to its method -> roles table; it is
    consulted only when `mutual_tls` is on.
    """

    def __init__(self, token: str | None, access: Mapping[str, Mapping[str, frozenset[str]]],
                 mutual_tls: bool) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._access = access
        self._mutual_tls = mutual_tls
        if self._expected is None and not mutual_tls:
            log.warning("the internal plane is OPEN: no cluster token and no mutual TLS configured; anyone who "
                        "reaches this port can call every method")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        if self._expected is not None and not self._token_presented(handler_call_details.invocation_metadata):
            # Refused from the metadata alone: the request is not even parsed.
            return _replace_behaviour(handler._replace(request_deserializer=None), _refusal(
                Unauthenticated("a valid cluster token is required (metadata authorization: Bearer ...)")))
        if not self._mutual_tls:
            return handler
        return _replace_behaviour(handler, _role_checked(_behaviour(handler), self._allowed(method)))

    def _token_presented(self, metadata: Any) -> bool:
        presented = dict(metadata or ()).get(AUTHORIZATION, "")
        if isinstance(presented, bytes):
            presented = presented.decode("latin-1")
        return hmac.compare_digest(presented.encode(), self._expected)

    def _allowed(self, method: str) -> frozenset[str]:
        service, _, name = method.strip("/").partition("/")
        return self._access.get(service, {}).get(name, frozenset())


def peer_role(context: grpc.aio.ServicerContext) -> str | None:
    """The role of the certificate the peer presented in the TLS handshake (None: no role, or no certificate)."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or []
    return certificate_role(bytes(pems[0])) if pems else None


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _replace_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """The handler with `behaviour` in the slot of its kind (unary or streaming, each way)."""
    if handler.request_streaming:
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
    else:
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
    if kind.endswith("_stream") and not inspect.isasyncgenfunction(behaviour):
        behaviour = _as_stream(behaviour)
    return handler._replace(**{kind: behaviour})


def _refusal(exc: Exception) -> Callable[..., Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise exc  # the error-mapping interceptor around this one gives the status

    return refuse


def _as_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def stream(request: Any, context: grpc.aio.ServicerContext):
        await behaviour(request, context)
        return
        yield  # an async generator that yields nothing

    return stream


def _role_checked(behaviour: Callable[..., Any], allowed: frozenset[str]) -> Callable[..., Any]:
    """`behaviour`, called only when the peer's certificate carries one of the `allowed` roles."""
    def check(context: grpc.aio.ServicerContext) -> None:
        role = peer_role(context)
        if role not in allowed:
            raise PermissionDenied(f"a certificate of role {role or 'none'!r} may not call this method")

    if inspect.isasyncgenfunction(behaviour):
        @functools.wraps(behaviour)
        async def checked_stream(request: Any, context: grpc.aio.ServicerContext):
            check(context)
            async for response in behaviour(request, context):
                yield response

        return checked_stream

    @functools.wraps(behaviour)
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        check(context)
        return await behaviour(request, context)

    return checked
