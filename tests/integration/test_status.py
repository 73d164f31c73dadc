"""`moemesh status` against a real mesh: nodes, models, queues and caches, as an operator sees them."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOEMESH_SCHEDULER_METRICS_PORT", "0")
        env.setenv("MOEMESH_GATEWAY_METRICS_PORT", "0")
        running = start_mesh(tmp_path_factory.mktemp("status"), "--no-embeddings", "--no-http")
    yield running
    stop_mesh(running)


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
