"""The internal plane checks every caller: the scheduler's and the worker's methods refuse a call without the cluster
token, or with another one, before anything runs; the mesh given the token by environment still serves; a heartbeat
or deregistration under a wrong lease changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.services.core.auth import SCHEDULER_ACCESS, WORKER_ACCESS
from moemesh.services.core.tls import ROLES
from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
)
from tests.support.mesh import DEMO_MODEL, Service, live

TOKEN = "internal-auth-test-token-0123456789"
WITH_TOKEN = (("authorization", f"Bearer {TOKEN}"),)
SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"]
WORKER = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
WORK = worker_pb2.GenerationWork(request_id="forged-1", model="demo-moe", prompt_token_ids=[1, 2, 3],
                                 sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0))
# What an intruder would send; a method not listed here is called with its empty request.
FORGED = {
    "Register": scheduler_pb2.RegisterRequest(node_id="intruder", address="127.0.0.1:9", models=[
        models_pb2.ModelInfo(id="demo-moe", kind=models_pb2.MODEL_KIND_GENERATION)]),
    "Heartbeat": scheduler_pb2.HeartbeatRequest(node_id="intruder", lease_id="guessed"),
    "Deregister": scheduler_pb2.DeregisterRequest(node_id="intruder", lease_id="guessed"),
    "Dispatch": worker_pb2.ExecuteRequest(add=WORK),
    "Execute": worker_pb2.ExecuteRequest(add=WORK),
    "Embed": worker_pb2.EmbedWork(model="demo-moe-pooled", inputs=["the tenant's secret text"]),
}
CREDENTIALS = {"no token": (), "a wrong token": (("authorization", "Bearer not-the-cluster-token"),),
               "the token without Bearer": (("authorization", TOKEN),)}


@dataclass
class TokenMesh:
    scheduler: Service
    worker: Service
    gateway: Service


@pytest.fixture(scope="module")
def token_mesh(tmp_path_factory):
    """Scheduler, worker and gateway started alone, each given the cluster token only by its environment variable."""
    tmp = tmp_path_factory.mktemp("auth")
    services = []
    with pytest.MonkeyPatch.context() as env:
        for service in ("SCHEDULER", "WORKER", "GATEWAY"):
            env.setenv(f"MOEMESH_{service}_CLUSTER_TOKEN", TOKEN)
        try:
            services.append(Service("moemesh.services.scheduler.main", "--port", "0", log=tmp / "scheduler.log"))
            scheduler = services[0].info["address"]
            services.append(Service("moemesh.worker.server.main", "--port", "0", "--scheduler", scheduler,
                                    "--model-dir", str(DEMO_MODEL), "--max-num-seqs", "4", log=tmp / "worker.log"))
            services.append(Service("moemesh.gateway.main", "--port", "0", "--scheduler", scheduler,
                                    log=tmp / "gateway.log"))
        except BaseException:
            for started in reversed(services):
                started.stop()
            raise
    yield TokenMesh(*services)
    for service in reversed(services):
        service.stop()


def call(channel: grpc.Channel, service, method_name: str, request, metadata) -> list:
    """Call `service`'s method by name with one request message, whatever its streaming shape."""
    method = service.methods_by_name[method_name]
    path = f"/{service.full_name}/{method.name}"
    serialize = type(request).SerializeToString
    if method.client_streaming:
        stub = (channel.stream_stream if method.server_streaming else channel.stream_unary)(
            path, request_serializer=serialize)
        reply = stub(iter([request]), metadata=metadata, timeout=10)
    else:
        stub = (channel.unary_stream if method.server_streaming else channel.unary_unary)(
            path, request_serializer=serialize)
        reply = stub(request, metadata=metadata, timeout=10)
    return list(reply) if method.server_streaming else [reply]


def forged(service, method_name: str):
    if method_name in FORGED:
        return FORGED[method_name]
    return message_factory.GetMessageClass(service.methods_by_name[method_name].input_type)()


def list_nodes(address: str) -> list:
    with grpc.insecure_channel(address) as channel:
        return list(scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(
            scheduler_pb2.ListNodesRequest(), metadata=WITH_TOKEN, timeout=10).nodes)


def test_every_internal_method_names_the_certificate_roles_that_may_call_it():
    assert set(SCHEDULER_ACCESS) == set(SCHEDULER.methods_by_name), "a scheduler method without an access rule"
    assert set(WORKER_ACCESS) == set(WORKER.methods_by_name), "a worker method without an access rule"
    for roles in [*SCHEDULER_ACCESS.values(), *WORKER_ACCESS.values()]:
        assert roles and roles <= set(ROLES)


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("method", list(SCHEDULER.methods_by_name))
def test_every_scheduler_method_refuses_a_caller_without_the_cluster_token(token_mesh, method, credential):
    address = token_mesh.scheduler.info["address"]
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel, SCHEDULER, method, forged(SCHEDULER, method), CREDENTIALS[credential])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, \
        f"{method} with {credential}: {caught.value.code()} {caught.value.details()}"
    nodes = list_nodes(address)
    assert [(n.node_id, live(n.state)) for n in nodes] == [(token_mesh.worker.info["node_id"], True)], \
        f"a refused {method} must change nothing in the registry"


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("method", list(WORKER.methods_by_name))
def test_every_worker_method_refuses_a_caller_without_the_cluster_token(token_mesh, method, credential):
    with grpc.insecure_channel(token_mesh.worker.info["address"]) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel, WORKER, method, forged(WORKER, method), CREDENTIALS[credential])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, \
        f"{method} with {credential}: {caught.value.code()} {caught.value.details()}"


def refused_without_token(address: str, service, method: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel, service, method, forged(service, method), ())
    return caught.value.code()


def test_the_worker_answers_the_token_and_only_the_token(token_mesh):
    address = token_mesh.worker.info["address"]
    with grpc.insecure_channel(address) as channel:
        [reply] = call(channel, WORKER, "Embed", FORGED["Embed"], WITH_TOKEN)
    assert reply, "the worker must answer a caller that presents the cluster token"
    assert refused_without_token(address, WORKER, "Embed") == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("service", "descriptor"), [("scheduler", SCHEDULER), ("worker", WORKER)])
def test_health_stays_open_for_probes_while_every_method_is_closed(token_mesh, service, descriptor):
    address = getattr(token_mesh, service).info["address"]
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, "a probe carries no credential"
    for method in descriptor.methods_by_name:
        assert refused_without_token(address, descriptor, method) == grpc.StatusCode.UNAUTHENTICATED, method


def test_the_mesh_given_the_token_by_environment_serves_end_to_end(token_mesh):
    scheduler = token_mesh.scheduler.info["address"]
    assert refused_without_token(scheduler, SCHEDULER, "Dispatch") == grpc.StatusCode.UNAUTHENTICATED, \
        "the scheduler must require the token, so that the gateway's success below shows it presents it"
    with grpc.insecure_channel(token_mesh.gateway.info["address"]) as channel:
        reply = generation_pb2_grpc.GenerationStub(channel).Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="def authenticate(request):"),
            sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)), timeout=60)
        assert reply.usage.completion_tokens == 6, "gateway -> scheduler -> worker must all accept the token"
        embedded = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(embeddings_pb2.EmbedRequest(
            model="demo-moe-pooled", inputs=["hello"], cache_mode=common_pb2.CACHE_MODE_NO_STORE), timeout=60)
    assert len(embedded.embeddings) == 1 and embedded.dimensions > 0, "the scheduler's Embed to a worker too"
    [node] = list_nodes(scheduler)
    assert node.routed_requests >= 1


def test_a_heartbeat_or_deregistration_under_a_wrong_lease_changes_nothing(token_mesh):
    address = token_mesh.scheduler.info["address"]
    node_id = token_mesh.worker.info["node_id"]
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        beats = iter([scheduler_pb2.HeartbeatRequest(node_id=node_id, lease_id="not-its-lease",
                                                     load=scheduler_pb2.NodeLoad(draining=True))])
        replies = list(stub.Heartbeat(beats, metadata=WITH_TOKEN, timeout=10))
        assert [r.command for r in replies] == [scheduler_pb2.HeartbeatReply.COMMAND_REREGISTER]
        stub.Deregister(scheduler_pb2.DeregisterRequest(node_id=node_id, lease_id="not-its-lease"),
                        metadata=WITH_TOKEN, timeout=10)
    nodes = list_nodes(address)  # the heartbeat stream's clean-up ran before its status reached us
    assert [(n.node_id, live(n.state)) for n in nodes] == [(node_id, True)], \
        "a wrong lease must neither evict, deregister nor drain the node"


def test_operators_list_the_nodes_with_the_token_from_their_environment(token_mesh):
    argv = [sys.executable, "-m", "moemesh.cli", "nodes", "--scheduler", token_mesh.scheduler.info["address"]]
    env = {k: v for k, v in os.environ.items() if k != "MOEMESH_CLUSTER_TOKEN"}
    listed = subprocess.run(argv, env={**env, "MOEMESH_CLUSTER_TOKEN": TOKEN}, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert [n["nodeId"] for n in json.loads(listed.stdout)["nodes"]] == [token_mesh.worker.info["node_id"]]
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
