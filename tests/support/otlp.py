"""A real OTLP/gRPC trace receiver on loopback, for tests: what the services export, span by span."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened: the exporting service, its ids (hex), name, attributes and events."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict = field(hash=False)
    events: tuple[str, ...] = ()
    status: int = 0  # 0 unset, 1 ok, 2 error
    links: tuple[str, ...] = ()  # linked span ids


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """`endpoint` takes OTLP trace exports (as an OpenTelemetry collector would); `spans()` lists them."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def __enter__(self) -> OtlpReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(None)

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=service, name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events=tuple(e.name for e in span.events), status=span.status.code,
                        links=tuple(link.span_id.hex() for link in span.links)))
        with self._changed:
            self._spans.extend(received)
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._changed:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, predicate, timeout: float = 20.0) -> list[ReceivedSpan]:
        """The spans once `predicate(spans)` holds (exporters send in batches); the last list on timeout."""
        with self._changed:
            self._changed.wait_for(lambda: predicate(list(self._spans)), timeout)
            return list(self._spans)
