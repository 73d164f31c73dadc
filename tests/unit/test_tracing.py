"""Tracing and request ids without a network: when traces are on, the scheduler's span of a request through a
failover (OpenTelemetry's in-memory exporter), and log lines that name their request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moemesh.gateway.calls import CallContext, grpc_call_context, http_call_context
from moemesh.services.core import tracing
from moemesh.services.core.errors import InvalidRequest
from moemesh.services.core.logs import JsonFormatter, bind_request, request_fields
from moemesh.services.scheduler.dispatcher import Session
from moemesh.v1 import common_pb2
from tests.unit.test_scheduler_dispatch import Mesh, batch, event, no_real_links, work  # noqa: F401 (fixture)


@pytest.fixture
def exported():
    """Spans of this process's request traces, kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.traced_by(provider):
        yield exporter


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
])
def test_the_standard_variables_turn_traces_on(env, on):
    assert tracing.tracing_requested(env) is on


def test_off_nothing_is_installed_and_a_callers_context_passes_through():
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    carrier = {"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}
    trace = tracing.request_trace("schedule", carrier, {})
    assert trace is tracing.NO_TRACE
    forwarded = dict(carrier)
    trace.inject(forwarded)
    assert forwarded == carrier, "the caller's trace context travels on unchanged"
    assert tracing.trace_id_of(carrier) == "ab" * 16
    assert tracing.trace_id_of({"traceparent": "00-" + "0" * 32 + "-" + "cd" * 8 + "-01"}) == ""
    assert tracing.trace_id_of({"traceparent": "garbage"}) == ""


async def test_the_scheduler_span_covers_queue_waits_runs_and_a_failover(exported):
    mesh = Mesh()
    mesh.add_node("A")
    session = Session()
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    submitted = work("r1")
    submitted.trace_context["traceparent"] = f"00-{trace_id}-{parent_id}-01"
    submitted.client_request_id = "order-1"
    mesh.dispatcher.submit(submitted, session)
    mesh.dispatcher._on_batch("A", batch(event("r1", [5, 6], "ab")))
    mesh.add_node("B")
    mesh.registry.evict("A")
    await asyncio.sleep(0)
    mesh.dispatcher._on_batch("B", batch(event("r1", [7], "c", finish=common_pb2.FINISH_REASON_STOP)))

    spans = {}
    for span in exported.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    (schedule,) = spans["schedule"]
    assert format(schedule.context.trace_id, "032x") == trace_id, "the gateway's trace goes on"
    assert format(schedule.parent.span_id, "016x") == parent_id
    assert schedule.attributes["moemesh.request_id"] == "order-1"
    assert schedule.attributes["moemesh.failovers"] == 1 and schedule.attributes["moemesh.delivered_tokens"] == 3
    assert [e.name for e in schedule.events] == ["failover"]
    assert len(spans["queue wait"]) == 2 and len(spans["run"]) == 2, "queued, ran on A, queued again, ran on B"
    assert [s.attributes["moemesh.node_id"] for s in spans["run"]] == ["A", "B"]
    assert all(s.parent.span_id == schedule.context.span_id for s in spans["run"] + spans["queue wait"])
    # Each worker got the scheduler's span as its parent.
    for node in ("A", "B"):
        (sent,) = mesh.links[node].adds()
        assert sent.trace_context["traceparent"].split("-")[1:3] == [trace_id, format(schedule.context.span_id,
                                                                                     "016x")]


async def test_a_refused_request_ends_its_span_with_the_status(exported):
    mesh = Mesh()
    session = Session()
    mesh.dispatcher.submit(work("r1"), session)  # no replica serves the model
    mesh.dispatcher.pump()
    (schedule,) = [s for s in exported.get_finished_spans() if s.name == "schedule"]
    assert schedule.status.status_code.name == "ERROR" and schedule.status.description == "UNAVAILABLE"


def test_log_lines_name_their_request_and_trace():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("moemesh.test.request_logs")
    logger.addHandler(handler)
    logger.propagate = False
    trace_id = secrets.token_hex(16)
    carrier = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}

    async def one_call():
        bind_request("order-7", carrier)
        logger.warning("something about this request")

    asyncio.run(one_call())
    logger.warning("about nothing in particular", extra=request_fields("order-8"))
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["request_id"], first["trace_id"]) == ("order-7", trace_id)
    assert second["request_id"] == "order-8" and "trace_id" not in second, "a task's binding stays in its task"


@pytest.mark.parametrize("value", ["a b", "x" * 129, "", "ünïcode", "a/b"])
def test_a_callers_request_id_must_be_a_plain_token(value):
    if not value:
        assert http_call_context({"X-Request-Id": value}) == CallContext("", {})
        return
    with pytest.raises(InvalidRequest, match="X-Request-Id"):
        http_call_context({"X-Request-Id": value})
    with pytest.raises(InvalidRequest, match="x-request-id"):
        grpc_call_context((("x-request-id", value),))


def test_the_call_context_keeps_only_the_trace_fields():
    traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"
    call = grpc_call_context((("x-request-id", "ok-1"), ("traceparent", traceparent), ("authorization", "k"),
                              ("tracestate", "vendor=1"), ("x-bin", b"\x00")))
    assert call.request_id == "ok-1"
    assert dict(call.trace) == {"traceparent": traceparent, "tracestate": "vendor=1"}


def test_a_malformed_or_oversized_trace_context_from_a_caller_is_dropped():
    good = f"00-{'ab' * 16}-{'cd' * 8}-01"
    assert tracing.incoming_context([("traceparent", good), ("tracestate", "v=1")]) == {"traceparent": good,
                                                                                         "tracestate": "v=1"}
    assert tracing.incoming_context([("traceparent", "not-a-traceparent"), ("tracestate", "v=1")]) == {}
    assert tracing.incoming_context([("tracestate", "v=1")]) == {}, "a tracestate alone means nothing"
    assert tracing.incoming_context([("traceparent", good), ("tracestate", "v" * 10_000)]) == {"traceparent": good}
    assert tracing.incoming_context([("traceparent", good.upper())]) == {}, "W3C trace ids are lower-case hex"
