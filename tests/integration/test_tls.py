"""Mutual TLS between the services: `moemesh up --tls` serves, and only holders of the mesh's certificates get in."""

from __future__ import annotations

import grpc
import pytest

from moemesh.local import start_mesh, stop_mesh
from moemesh.services.core.tls import make_certificates
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    running = start_mesh(tmp, "--tls", "--tls-dir", str(tmp / "certs"), "--no-http", "--no-embeddings")
    yield running
    stop_mesh(running)


def certs(mesh):
    import pathlib

    return pathlib.Path(mesh.ready["tls_dir"])


def test_the_mesh_serves_with_mutual_tls_inside(mesh):
    assert sorted(p.name for p in certs(mesh).glob("*.crt")) == ["ca.crt", "gateway.crt", "scheduler.crt", "worker.crt"]
    with grpc.insecure_channel(mesh.gateway) as ch:  # the public port: clients reach the edge as before
        reply = generation_pb2_grpc.GenerationStub(ch).Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="import ssl"), sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0)),
            timeout=60)
    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH and reply.usage.completion_tokens == 6


def list_nodes(channel):
    return scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=5).nodes


def test_a_holder_of_the_mesh_certificate_is_let_in(mesh):
    directory = certs(mesh)
    credentials = grpc.ssl_channel_credentials((directory / "ca.crt").read_bytes(), (directory / "gateway.key").read_bytes(),
                                               (directory / "gateway.crt").read_bytes())
    with grpc.secure_channel(mesh.scheduler, credentials) as ch:
        assert [n.state for n in list_nodes(ch)] == ["ready"]


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "another CA's certificate"])
def test_anyone_else_is_refused_by_the_scheduler_and_the_worker(mesh, tmp_path, who):
    directory = certs(mesh)
    ca = (directory / "ca.crt").read_bytes()
    if who == "another CA's certificate":
        make_certificates(tmp_path / "rogue")
        credentials = grpc.ssl_channel_credentials(ca, (tmp_path / "rogue" / "gateway.key").read_bytes(),
                                                   (tmp_path / "rogue" / "gateway.crt").read_bytes())
    elif who == "no client certificate":
        credentials = grpc.ssl_channel_credentials(ca)
    for target in (mesh.scheduler, mesh.workers[0]):
        channel = grpc.insecure_channel(target) if who == "plaintext" else grpc.secure_channel(target, credentials)
        with channel, pytest.raises(grpc.RpcError) as caught:
            list_nodes(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, f"{who} at {target}: {caught.value.details()}"
