"""The audit log: one structured record per request (logger `moemesh.audit`), prompt text only when configured.

Refused authentications are audited too (kind "auth", status UNAUTHENTICATED): the front door, the caller's
address and why the credential was refused, never the credential itself. Every record is also counted by kind and
status (`outcomes`, exported as `moemesh_gateway_requests_total`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from google.rpc import code_pb2

from moemesh.services.core.errors import MeshError, Unauthenticated
from moemesh.v1 import generation_pb2

audit_log = logging.getLogger("moemesh.audit")


def status_name(exc: BaseException) -> str:
    """The status name (gRPC's, google.rpc.Code's) an exception ends a request with."""
    if isinstance(exc, MeshError):
        return code_pb2.Code.Name(exc.code)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "INTERNAL"


class AuditLog:
    """Writes the audit records; `prompts` (GatewayConfig.audit_prompts) adds a generation's prompt text."""

    def __init__(self, prompts: bool = False) -> None:
        self.prompts = prompts
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()  # (kind, status) -> records

    def record(self, kind: str, request_id: str, tenant: str, model: str, status: str, started: float,
               **fields) -> None:
        """One record: who, what, how much, how long (since `started`, a perf_counter time), how it ended."""
        self.outcomes[(kind, status)] += 1
        audit_log.info("request", extra={"audit": {
            "kind": kind, "request_id": request_id, "tenant": tenant, "model": model, "status": status,
            "latency_s": round(time.perf_counter() - started, 6), **fields,
        }})

    def refused(self, exc: Unauthenticated, *, transport: str, method: str, peer: str | None) -> None:
        """The record of a refused authentication: where (front door and method), from whom (the peer address)
        and why (`exc.reason`); the credential is not written."""
        self.record("auth", "", "", "", code_pb2.Code.Name(exc.code), time.perf_counter(), transport=transport,
                    method=method, peer=peer or "", reason=exc.reason)

    def prompt_fields(self, request: generation_pb2.GenerateRequest) -> dict[str, str]:
        """The record's `prompt` field when prompts are audited (the text, or the chat's messages), else none."""
        if not self.prompts:
            return {}
        return {"prompt": request.prompt.text or "\n".join(m.content for m in request.prompt.chat.messages)}
