"""What the transport tells about a call besides its request: the caller's request id and trace context.

A caller (or a proxy in front of the gateway: Envoy sets one on every request) may name its call with
`X-Request-Id` (HTTP) or `x-request-id` metadata (gRPC). The gateway honours it as the id the request is known
by: the answer's id and `X-Request-Id` header, the audit record, and every service's log lines about it. It does
not make the request resumable (that is `request_id` in the body's sense, a journal in Redis): a proxy's ids
would journal every request. A caller's W3C `traceparent` is continued, traced or not (see tracing.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from moemesh.gateway.validation import REQUEST_ID
from moemesh.services.core.errors import InvalidRequest
from moemesh.services.core.tracing import incoming_context


@dataclass(frozen=True)
class CallContext:
    """The caller's id for the call ("" when it named none) and its trace context (W3C fields)."""

    request_id: str = ""
    trace: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, str]], header: str) -> CallContext:
        """From lower-cased header or metadata pairs; an id that is not 1..128 characters of [A-Za-z0-9._:-] is
        refused (InvalidRequest naming `header`)."""
        request_id = next((value for key, value in pairs if key == "x-request-id" and isinstance(value, str)), "")
        if request_id and not REQUEST_ID.fullmatch(request_id):
            raise InvalidRequest(header, "must be 1..128 characters of [A-Za-z0-9._:-]")
        return cls(request_id, incoming_context(pairs))


NO_CALL_CONTEXT = CallContext()


def grpc_call_context(metadata) -> CallContext:
    """The call context of gRPC invocation metadata (binary values are skipped)."""
    pairs = []
    for item in metadata or ():
        key, value = (item.key, item.value) if hasattr(item, "key") else item
        pairs.append((key.lower(), value))
    return CallContext.of(pairs, "x-request-id")


def http_call_context(headers: Mapping[str, str]) -> CallContext:
    """The call context of HTTP headers (Starlette's, case-insensitive)."""
    pairs = [(key.lower(), value) for key, value in headers.items()
             if key.lower() in ("x-request-id", "traceparent", "tracestate")]
    return CallContext.of(pairs, "X-Request-Id")
