"""Structured (JSON lines) logging for every service.

A line about a request carries its `request_id` and `trace_id`: passed through `extra=` where one piece of code
serves many requests (the multiplexed streams: `request_fields`), or bound to the handling task's context with
`bind_request` where a task serves one request (the gateway's calls), so that every line logged in that task,
by any module, carries them. With tracing on, the active span's trace id fills in when nothing else names one.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Mapping

from moemesh.services.core.tracing import current_trace_id, trace_id_of

# Attributes every LogRecord has; anything else was passed through `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# The request the current task serves ({"request_id", "trace_id"}), bound by `bind_request`.
_request: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("moemesh_request", default=None)


def request_fields(request_id: str, carrier: Mapping[str, str] | None = None) -> dict[str, str]:
    """The log fields of one request: its id, and the trace id its trace context names (when it names one)."""
    trace_id = trace_id_of(carrier) if carrier else ""
    return {"request_id": request_id, "trace_id": trace_id} if trace_id else {"request_id": request_id}


def bind_request(request_id: str, carrier: Mapping[str, str] | None = None) -> None:
    """From here on in this task (and tasks it starts), log lines carry the request's id and trace id."""
    _request.set(request_fields(request_id, carrier))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, service, logger, message, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = _request.get()
        if bound is not None:
            entry.update(bound)
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if "request_id" in entry and "trace_id" not in entry:
            trace_id = current_trace_id()
            if trace_id:
                entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "info") -> None:
    """Route the root logger to stderr as JSON lines tagged with the service name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
