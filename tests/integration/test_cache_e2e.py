"""The gateway's Redis caches through a real mesh: hits skip the scheduler, tenants and cache control hold."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import grpc
import pytest

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)
from tests.support.mesh import routed_requests


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    # The tests count hits: a cache write past the default 0.2 s timeout (a loaded host) would be a designed miss.
    env = {"MOEMESH_GATEWAY_METRICS_PORT": "0", "MOEMESH_GATEWAY_CACHE_REDIS_TIMEOUT": "2"}
    os.environ.update(env)
    try:
        running = start_mesh(tmp_path_factory.mktemp("cache"), "--no-http")
    finally:
        for name in env:
            del os.environ[name]
    yield running
    stop_mesh(running)


def run(mesh, text: str, mode=common_pb2.CACHE_MODE_DEFAULT, **sampling) -> tuple[str, common_pb2.Usage]:
    sampling.setdefault("max_tokens", 12)
    request = generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=text), cache_mode=mode,
                                             sampling=common_pb2.SamplingParams(**sampling))
    with grpc.insecure_channel(mesh.gateway) as ch:
        events = list(generation_pb2_grpc.GenerationStub(ch).Generate(request, timeout=60))
    return "".join(e.text for e in events), events[-1].usage


def test_a_repeated_greedy_request_is_answered_from_the_cache_without_the_scheduler(mesh):
    text, usage = run(mesh, "def cached_greedy():", temperature=0.0)
    assert not usage.from_response_cache
    before = routed_requests(mesh)
    again, usage2 = run(mesh, "def cached_greedy():", temperature=0.0)
    assert again == text and usage2.from_response_cache
    assert usage2.cached_tokens == usage2.prompt_tokens == usage.prompt_tokens
    assert routed_requests(mesh) == before, "a cache hit must not reach the scheduler"


def test_seeded_sampling_is_cached_and_unseeded_sampling_never(mesh):
    text, _ = run(mesh, "import os", temperature=0.9, seed=5)
    again, usage = run(mesh, "import os", temperature=0.9, seed=5)
    assert again == text and usage.from_response_cache
    _, usage = run(mesh, "import os", temperature=0.9)
    _, usage = run(mesh, "import os", temperature=0.9)
    assert not usage.from_response_cache


def test_cache_control_no_cache_and_no_store(mesh):
    run(mesh, "class Ledger:", temperature=0.0)
    before = routed_requests(mesh)
    _, usage = run(mesh, "class Ledger:", common_pb2.CACHE_MODE_NO_CACHE, temperature=0.0)
    assert not usage.from_response_cache and routed_requests(mesh) == before + 1
    _, usage = run(mesh, "class Journal:", common_pb2.CACHE_MODE_NO_STORE, temperature=0.0)
    _, usage = run(mesh, "class Journal:", temperature=0.0)
    assert not usage.from_response_cache, "a no-store answer must not have been kept"


def test_identical_concurrent_requests_cause_one_generation(mesh):
    before = routed_requests(mesh)
    results = []

    def call():
        results.append(run(mesh, "def single_flight(x):", temperature=0.0, max_tokens=120, ignore_eos=True)[0])

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and len(set(results)) == 1
    assert routed_requests(mesh) - before == 1, "6 identical concurrent requests must share one generation"


def test_the_first_of_identical_requests_going_away_ends_no_other(mesh):
    """Two identical greedy streams share one generation; the client of the first hangs up after one event. The
    second runs to its end with the whole answer (it once waited until its deadline), and the answer is stored."""
    request = generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(text="def left_early(x):"),
        sampling=common_pb2.SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True))
    before = routed_requests(mesh)
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        first = stub.Generate(request, timeout=60)
        next(first)
        second = stub.Generate(request, timeout=60)
        head = next(second)
        first.cancel()
        started = time.monotonic()
        events = [head, *second]
        assert time.monotonic() - started < 30, "the second stream must not wait for a deadline"
    assert events[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and events[-1].usage.completion_tokens == 300
    assert sum(len(e.token_ids) for e in events) == 300
    assert routed_requests(mesh) - before == 1, "one generation for both"
    text, usage = run(mesh, "def left_early(x):", max_tokens=300, temperature=0.0, ignore_eos=True)
    assert usage.from_response_cache and text == "".join(e.text for e in events)


def test_embedding_cache_computes_only_the_new_inputs(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = embeddings_pb2_grpc.EmbeddingsStub(ch)
        first = stub.Embed(embeddings_pb2.EmbedRequest(inputs=["overdue invoice", "paid invoice"]), timeout=60)
        second = stub.Embed(embeddings_pb2.EmbedRequest(inputs=["paid invoice", "new customer"]), timeout=60)
    assert first.usage.cached_tokens == 0
    assert 0 < second.usage.cached_tokens < second.usage.prompt_tokens, "one of two inputs came from the cache"
    assert list(second.embeddings[0].values) == list(first.embeddings[1].values)


def test_cache_metrics_count_hits_misses_and_bytes_per_tier(mesh):
    from prometheus_client.parser import text_string_to_metric_families

    run(mesh, "def metered():", temperature=0.0)
    run(mesh, "def metered():", temperature=0.0)
    body = urllib.request.urlopen(f"http://{mesh.ready['gateway']['metrics_address']}/metrics", timeout=10).read()
    values = {(s.name, s.labels.get("tier")): s.value
              for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    assert values[("moemesh_cache_hits_total", "response")] >= 1
    assert values[("moemesh_cache_misses_total", "response")] >= 1
    assert values[("moemesh_cache_written_bytes_total", "response")] > 0
    assert ("moemesh_cache_hits_total", "embedding") in values
    assert values[("moemesh_cache_lookup_seconds_p50", "response")] > 0, "the median of recent Redis lookups is missing"


def audit_records(mesh) -> list[dict]:
    records = []
    for line in (mesh.log_dir / "gateway.log").read_text().splitlines():
        if '"moemesh.audit"' in line:
            records.append(json.loads(line)["audit"])
    return records


def test_one_audit_record_per_request_without_prompt_text(mesh):
    secret = "def audit_me_secret_prompt():"
    run(mesh, secret, temperature=0.0)
    run(mesh, secret, temperature=0.0)  # a cache hit
    with pytest.raises(grpc.RpcError):
        run(mesh, secret, max_tokens=-1)
    time.sleep(0.5)  # the log line is written as the stream ends
    records = [r for r in audit_records(mesh) if r["kind"] == "generate"]
    ok = [r for r in records if r["status"] == "OK"]
    assert {"request_id", "tenant", "model", "latency_s", "prompt_tokens", "completion_tokens", "cached_tokens",
            "response_cache"} <= set(ok[-1])
    assert ok[-1]["response_cache"] is True and ok[-2]["response_cache"] is False
    assert ok[-1]["tenant"] == "default" and ok[-1]["completion_tokens"] == 12
    assert records[-1]["status"] == "INVALID_ARGUMENT"
    assert secret not in (mesh.log_dir / "gateway.log").read_text(), "no prompt text unless configured"
