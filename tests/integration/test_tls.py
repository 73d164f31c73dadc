"""Mutual TLS between the services: `moemesh up --tls` serves, only holders of the mesh's certificates get in, and
each method accepts only the certificate roles that need it."""

from __future__ import annotations

import pathlib
import threading

import grpc
import pytest

from moemesh.local import start_mesh, stop_mesh
from moemesh.services.core.tls import ROLES, certificate_role, make_certificates
from moemesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.support.mesh import live

TOKEN = "tls-test-cluster-token-0123456789"  # both credentials are checked when both are configured
WITH_TOKEN = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOEMESH_CLUSTER_TOKEN", TOKEN)
        running = start_mesh(tmp, "--tls", "--tls-dir", str(tmp / "certs"), "--no-http", "--no-embeddings")
    yield running
    stop_mesh(running)


def certs(mesh) -> pathlib.Path:
    return pathlib.Path(mesh.ready["tls_dir"])


def as_role(mesh, role: str) -> grpc.ChannelCredentials:
    directory = certs(mesh)
    return grpc.ssl_channel_credentials((directory / "ca.crt").read_bytes(), (directory / f"{role}.key").read_bytes(),
                                        (directory / f"{role}.crt").read_bytes())


def test_the_mesh_serves_with_mutual_tls_inside(mesh):
    assert sorted(p.name for p in certs(mesh).glob("*.crt")) == sorted(["ca.crt", *(f"{r}.crt" for r in ROLES)])
    with grpc.insecure_channel(mesh.gateway) as ch:  # the public port: clients reach the edge as before
        reply = generation_pb2_grpc.GenerationStub(ch).Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="import ssl"), sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0)),
            timeout=60)
    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH and reply.usage.completion_tokens == 6


def test_each_certificate_carries_its_role(mesh):
    for role in ROLES:
        pem = (certs(mesh) / f"{role}.crt").read_bytes()
        assert certificate_role(pem) == role, f"{role}.crt must name its role (SAN URI moemesh:role:{role})"
        assert f"moemesh:role:{role}".encode() in _der_text(pem)


def _der_text(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def list_nodes(channel, metadata=WITH_TOKEN):
    return scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(scheduler_pb2.ListNodesRequest(), metadata=metadata,
                                                               timeout=5).nodes


@pytest.mark.parametrize("role", ["gateway", "operator"])
def test_the_gateway_and_operators_may_list_the_nodes(mesh, role):
    with grpc.secure_channel(mesh.scheduler, as_role(mesh, role)) as ch:
        assert [live(n.state) for n in list_nodes(ch)] == [True], "one node, registered and serving"


def embed_work() -> worker_pb2.EmbedWork:
    return worker_pb2.EmbedWork(model="demo-moe-pooled", inputs=["which role may embed?"])


def execute(channel) -> list:
    work = worker_pb2.GenerationWork(request_id="tls-role", model="demo-moe", prompt_token_ids=[1, 5, 9],
                                     sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    finished = threading.Event()

    def requests():  # the worker ends the stream when the caller closes its side: keep it open until the end
        yield worker_pb2.ExecuteRequest(add=work)
        finished.wait(30)

    events = []
    try:
        for batch in worker_pb2_grpc.WorkerStub(channel).Execute(requests(), metadata=WITH_TOKEN, timeout=30):
            events += batch.events
            if any(e.finish_reason or e.HasField("error") for e in batch.events):
                break
    finally:
        finished.set()
    return events


# (service, method, the certificate that calls it): each is a role the method does not accept.
WRONG_ROLES = [
    ("scheduler", "Register", "gateway"),
    ("scheduler", "Heartbeat", "gateway"),
    ("scheduler", "Deregister", "scheduler"),
    ("scheduler", "Dispatch", "worker"),
    ("scheduler", "Embed", "worker"),
    ("scheduler", "ListModels", "operator"),
    ("scheduler", "ListNodes", "worker"),
    ("worker", "Execute", "gateway"),
    ("worker", "Embed", "gateway"),
    ("worker", "Embed", "worker"),
]


def call_as(mesh, service: str, method: str, role: str):
    target = mesh.scheduler if service == "scheduler" else mesh.workers[0]
    with grpc.secure_channel(target, as_role(mesh, role)) as ch:
        if service == "worker":
            stub = worker_pb2_grpc.WorkerStub(ch)
            return execute(ch) if method == "Execute" else stub.Embed(embed_work(), metadata=WITH_TOKEN, timeout=30)
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        requests = {
            "Register": scheduler_pb2.RegisterRequest(node_id="intruder", address="127.0.0.1:9"),
            "Deregister": scheduler_pb2.DeregisterRequest(node_id="intruder", lease_id="x"),
            "Embed": worker_pb2.EmbedWork(model="demo-moe-pooled", inputs=["x"]),
            "ListModels": models_pb2.ListModelsRequest(),
            "ListNodes": scheduler_pb2.ListNodesRequest(),
        }
        if method == "Heartbeat":
            return list(stub.Heartbeat(iter([scheduler_pb2.HeartbeatRequest(node_id="intruder")]),
                                       metadata=WITH_TOKEN, timeout=10))
        if method == "Dispatch":
            return list(stub.Dispatch(iter([worker_pb2.ExecuteRequest(cancel=worker_pb2.Cancel(request_id="x"))]),
                                      metadata=WITH_TOKEN, timeout=10))
        return getattr(stub, method)(requests[method], metadata=WITH_TOKEN, timeout=10)


@pytest.mark.parametrize(("service", "method", "role"), WRONG_ROLES)
def test_a_certificate_of_a_role_the_method_does_not_accept_is_permission_denied(mesh, service, method, role):
    with pytest.raises(grpc.RpcError) as caught:
        call_as(mesh, service, method, role)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, \
        f"{service}.{method} as {role}: {caught.value.code()} {caught.value.details()}"
    assert [n.node_id for n in list_nodes_as_operator(mesh)] == [mesh.ready["workers"][0]["node_id"]], \
        "a refused call changes nothing in the registry"


def list_nodes_as_operator(mesh) -> list:
    with grpc.secure_channel(mesh.scheduler, as_role(mesh, "operator")) as ch:
        return list(list_nodes(ch))


def test_the_scheduler_certificate_may_execute_and_embed_on_a_worker(mesh):
    reply = call_as(mesh, "worker", "Embed", "scheduler")
    assert reply.vectors.shape and reply.token_counts, "the scheduler's role is the one a worker serves"
    events = call_as(mesh, "worker", "Execute", "scheduler")
    assert sum(len(e.token_ids) for e in events) == 3 and not any(e.HasField("error") for e in events)


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
