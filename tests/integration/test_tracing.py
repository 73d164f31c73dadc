"""Traces and request ids through a real mesh: `moemesh up` exporting OTLP to a real receiver on loopback.

One trace per request spans the gateway, the scheduler and the worker (for generations over gRPC and HTTP, and
for embeddings); a caller's `traceparent` is continued; a caller's X-Request-Id names the request in the answer
and in every service's log lines about it.
"""

from __future__ import annotations

import json
import secrets

import grpc
import httpx
import pytest

from moemesh.v1 import common_pb2, embeddings_pb2, embeddings_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.support.otlp import OtlpReceiver

SERVICES = {"moemesh-gateway", "moemesh-scheduler", "moemesh-worker"}


@pytest.fixture(scope="module")
def receiver(otlp_receiver):
    return otlp_receiver


@pytest.fixture(scope="module")
def mesh(traced_mesh):
    """The run's shared demo mesh (tests/conftest.py): traces on by the standard variables, exported to the
    receiver; debug logs in the scheduler and the worker (their per-request lines)."""
    return traced_mesh


def new_traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def spans_of(receiver: OtlpReceiver, trace_id: str, wanted: set[str]) -> list:
    """The trace's spans, once every span name in `wanted` ("service/name") has arrived."""
    def arrived(spans):
        names = {f"{s.service}/{s.name}" for s in spans if s.trace_id == trace_id}
        return wanted <= names
    receiver.wait_for(arrived)
    return receiver.spans(trace_id)


def log_lines(mesh, service: str) -> list[dict]:
    lines = []
    for path in mesh.log_dir.glob(f"{service}*.log"):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines


def test_a_generation_is_one_trace_across_the_three_services_continuing_the_callers(mesh, receiver):
    trace_id, traceparent = new_traceparent()
    with grpc.insecure_channel(mesh.gateway) as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="def trace_me():"), cache_mode=common_pb2.CACHE_MODE_NO_STORE,
            sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0.0)),
            metadata=(("traceparent", traceparent), ("x-request-id", "order-4711")), timeout=60))
    assert responses[-1].request_id == "order-4711", "the caller's x-request-id names the request"
    wanted = {"moemesh-gateway//moemesh.v1.Generation/Generate", "moemesh-gateway/auth",
              "moemesh-gateway/admit", "moemesh-gateway/dispatch", "moemesh-scheduler/schedule",
              "moemesh-scheduler/queue wait", "moemesh-scheduler/run", "moemesh-worker/generate",
              "moemesh-worker/prefill", "moemesh-worker/decode"}
    spans = spans_of(receiver, trace_id, wanted)
    names = {f"{s.service}/{s.name}" for s in spans}
    assert wanted <= names, f"missing spans {wanted - names}; the trace has {sorted(names)}"
    by_name = {f"{s.service}/{s.name}": s for s in spans}
    server = by_name["moemesh-gateway//moemesh.v1.Generation/Generate"]
    assert server.parent_id == traceparent.split("-")[2], "the gateway's span continues the caller's"
    dispatch, schedule = by_name["moemesh-gateway/dispatch"], by_name["moemesh-scheduler/schedule"]
    worker = by_name["moemesh-worker/generate"]
    assert schedule.parent_id == dispatch.span_id, "the scheduler's span is the child of the gateway's dispatch"
    assert worker.parent_id == schedule.span_id, "the worker's span is the child of the scheduler's"
    assert worker.attributes["moemesh.completion_tokens"] == 6
    assert worker.attributes["moemesh.request_id"] == "order-4711"
    assert "first token" in worker.events and "first token" in dispatch.events
    assert by_name["moemesh-worker/prefill"].parent_id == worker.span_id
    assert dispatch.attributes["moemesh.completion_tokens"] == 6

    # Every service's log lines about the request carry its id and the trace id.
    audit = [e for e in log_lines(mesh, "gateway") if e.get("audit", {}).get("request_id") == "order-4711"]
    assert audit and audit[0]["trace_id"] == trace_id and audit[0]["request_id"] == "order-4711", audit
    for service, message in (("scheduler", "request ended"), ("worker", "request finished")):
        lines = [e for e in log_lines(mesh, service) if e.get("request_id") == "order-4711"]
        assert any(e["msg"] == message and e.get("trace_id") == trace_id for e in lines), \
            f"{service} logs: {lines or mesh.logs()[-3000:]}"


def test_an_embedding_is_one_trace_across_the_three_services(mesh, receiver):
    trace_id, traceparent = new_traceparent()
    with grpc.insecure_channel(mesh.gateway) as channel:
        result = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(inputs=[f"traced {trace_id}"], cache_mode=common_pb2.CACHE_MODE_NO_STORE),
            metadata=(("traceparent", traceparent),), timeout=60)
    assert len(result.embeddings) == 1
    # The gRPC instrumentation names a call's span by its full method ("/package.Service/Method").
    wanted = {"moemesh-gateway//moemesh.v1.Embeddings/Embed", "moemesh-scheduler//moemesh.v1.Scheduler/Embed",
              "moemesh-worker//moemesh.v1.Worker/Embed"}
    spans = spans_of(receiver, trace_id, wanted)
    names = {f"{s.service}/{s.name}" for s in spans}
    assert wanted <= names, f"missing spans {wanted - names}; the trace has {sorted(names)}"


def test_an_http_request_is_traced_and_keeps_the_callers_request_id(mesh, receiver):
    trace_id, traceparent = new_traceparent()
    response = httpx.post(f"http://{mesh.http}/v1/chat/completions", timeout=60, headers={
        "traceparent": traceparent, "X-Request-Id": "crm-ticket-99"}, json={
        "model": "demo-moe", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
        "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == "crm-ticket-99"
    assert response.json()["id"].endswith("crm-ticket-99")
    wanted = {"moemesh-gateway/POST /v1/chat/completions", "moemesh-gateway/dispatch",
              "moemesh-scheduler/schedule", "moemesh-worker/generate"}
    spans = spans_of(receiver, trace_id, wanted)
    names = {f"{s.service}/{s.name}" for s in spans}
    assert wanted <= names, f"missing spans {wanted - names}; the trace has {sorted(names)}"
    assert not any(s.name.endswith(("http send", "http receive")) for s in spans), "no span per streamed chunk"


def test_a_malformed_request_id_is_refused_naming_the_header(mesh):
    response = httpx.post(f"http://{mesh.http}/v1/completions", timeout=30, headers={"X-Request-Id": "a b/c"},
                          json={"model": "demo-moe", "prompt": "x", "max_tokens": 1})
    assert response.status_code == 400 and "X-Request-Id" in response.text, response.text
    with grpc.insecure_channel(mesh.gateway) as channel, pytest.raises(grpc.RpcError) as refused:
        generation_pb2_grpc.GenerationStub(channel).Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="x"), sampling=common_pb2.SamplingParams(max_tokens=1)),
            metadata=(("x-request-id", "x" * 129),), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" in refused.value.details()
