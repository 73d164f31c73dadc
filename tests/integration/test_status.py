"""`moemesh status` against a real mesh: nodes, models, queues and caches, as an operator sees them."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """`moemesh up` with no metrics setting: metrics are on by default."""
    with pytest.MonkeyPatch.context() as env:
        for service in ("GATEWAY", "SCHEDULER", "WORKER"):
            env.delenv(f"MOEMESH_{service}_METRICS_PORT", raising=False)
        running = start_mesh(tmp_path_factory.mktemp("status"), "--no-embeddings", "--no-http")
    yield running
    stop_mesh(running)


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from a Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_on_by_default_and_the_histograms_move_with_traffic(mesh):
    addresses = {name: mesh.ready[name]["metrics_address"] for name in ("gateway", "scheduler")}
    addresses["worker"] = mesh.ready["workers"][0]["metrics_address"]
    assert all(addresses.values()), f"every service exports metrics under moemesh up: {addresses}"
    before = scrape(addresses["gateway"])
    with grpc.insecure_channel(mesh.gateway) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for i in range(3):
            stub.Complete(generation_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=f"def metrics_{i}():"), cache_mode=common_pb2.CACHE_MODE_NO_STORE,
                sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0.0)), timeout=60)
    after, scheduler = scrape(addresses["gateway"]), scrape(addresses["scheduler"])
    model = (("model", "demo-moe"),)
    for name in ("moemesh_gateway_time_to_first_token_seconds_count", "moemesh_gateway_request_duration_seconds_count",
                 "moemesh_gateway_time_per_output_token_seconds_count", "moemesh_gateway_completion_tokens_count"):
        assert after[(name, model)] - before.get((name, model), 0) == 3, name
    assert after[("moemesh_gateway_completion_tokens_sum", model)] - \
        before.get(("moemesh_gateway_completion_tokens_sum", model), 0) == 15
    assert after[("moemesh_gateway_time_to_first_token_seconds_bucket", (("le", "+Inf"), *model))] >= 3
    assert scheduler[("moemesh_scheduler_queue_wait_seconds_count", model)] >= 3
    assert scheduler[("moemesh_scheduler_batch_size_count", model)] >= 1
    assert scrape(addresses["worker"]), "the worker's endpoint answers"


def status(mesh, *args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOEMESH_CLUSTER_TOKEN"}
    if token is not None:
        env["MOEMESH_CLUSTER_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "moemesh.cli", "status", "--ready-file", str(mesh.ready_file), *args],
                          capture_output=True, text=True, timeout=60, env=env | {"COLUMNS": "250"})


def test_status_shows_the_nodes_models_queues_and_caches(mesh):
    with grpc.insecure_channel(mesh.gateway) as channel:  # one request: the model's queue exists from then on
        generation_pb2_grpc.GenerationStub(channel).Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="def status():"), sampling=common_pb2.SamplingParams(max_tokens=2)),
            timeout=60)
    shown = status(mesh, token=mesh.cluster_token)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    worker = mesh.ready["workers"][0]
    for expected in ("nodes", worker["node_id"], "worker", "ready", "models", "demo-moe", "queues and caches",
                     "queued requests", "failovers", "cache misses"):
        assert expected in shown.stdout, f"{expected!r} missing from:\n{shown.stdout}"


def test_status_without_the_cluster_token_says_what_it_could_not_read(mesh):
    shown = status(mesh, token=None)
    assert shown.returncode == 1
    assert "not read: scheduler" in shown.stdout and "UNAUTHENTICATED" in shown.stdout
    assert "demo-moe" in shown.stdout, "what the gateway answers is still shown"
