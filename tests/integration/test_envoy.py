"""The real Envoy in front of two gateway replicas: gRPC streaming, REST transcoding, a replica stopped."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import grpc
import pytest

from moemesh.cache.embedded import free_port
from moemesh.envoy import EnvoySettings, envoy_binary, write_config
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from protos.generate import descriptor_set
from tests.support.mesh import Service


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def edge(tmp_path_factory, traced_mesh):
    """Envoy in front of two gateways: the shared demo mesh's (tests/conftest.py) and a second one of this module."""
    tmp = tmp_path_factory.mktemp("envoy")
    mesh = traced_mesh
    second = envoy = None
    try:
        second = Service("moemesh.gateway.main", "--port", "0", "--scheduler", mesh.scheduler, log=tmp / "gateway2.log",
                         env={"MOEMESH_GATEWAY_CLUSTER_TOKEN": mesh.cluster_token})
        port, admin = free_port(), free_port()
        settings = EnvoySettings(gateways=[mesh.gateway, second.info["address"]], port=port, admin_port=admin,
                                 descriptor_set=descriptor_set(tmp / "moemesh.pb"), health_check_interval_seconds=0.5)
        config = write_config(settings, tmp / "envoy.json")
        with open(tmp / "envoy.log", "wb") as log:
            envoy = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--use-dynamic-base-id",
                                      "--log-level", "warn"], stdout=log, stderr=log)
        wait_listening(port)
        time.sleep(1.5)  # first health checks mark both replicas healthy
        yield {"mesh": mesh, "second": second, "address": f"127.0.0.1:{port}", "tmp": tmp}
    finally:
        if envoy is not None:
            envoy.terminate()
            envoy.wait(timeout=30)
        if second is not None:
            second.stop()


def greedy(text: str, max_tokens: int = 16) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=text), cache_mode=common_pb2.CACHE_MODE_NO_STORE,
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_a_grpc_stream_through_envoy_equals_the_direct_one(edge):
    request = greedy("def route(request):", 24)
    with grpc.insecure_channel(edge["mesh"].gateway) as direct:
        expected = list(generation_pb2_grpc.GenerationStub(direct).Generate(request, timeout=60))
    with grpc.insecure_channel(edge["address"]) as channel:
        events = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    # Event boundaries depend on timing (a slow reader gets merged events); the content may not.
    assert "".join(e.text for e in events) == "".join(e.text for e in expected)
    assert [t for e in events for t in e.token_ids] == [t for e in expected for t in e.token_ids]
    assert len(events) > 1 and [e.index for e in events] == list(range(len(events)))
    assert events[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_rest_callers_reach_the_grpc_api_through_transcoding(edge):
    body = json.dumps({"prompt": {"text": "def route(request):"}, "sampling": {"max_tokens": 8, "temperature": 0},
                       "cache_mode": "CACHE_MODE_NO_STORE"}).encode()
    request = urllib.request.Request(f"http://{edge['address']}/rest/v1/complete", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    with grpc.insecure_channel(edge["mesh"].gateway) as direct:
        expected = generation_pb2_grpc.GenerationStub(direct).Complete(greedy("def route(request):", 8), timeout=60)
    assert reply["text"] == expected.text and reply["usage"]["completion_tokens"] == 8
    models = json.loads(urllib.request.urlopen(f"http://{edge['address']}/rest/v1/models", timeout=30).read())
    assert "demo-moe" in {m["id"] for m in models["models"]}
    bad = urllib.request.Request(f"http://{edge['address']}/rest/v1/complete", method="POST",
                                 data=json.dumps({"prompt": {"text": ""}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=30)
    assert caught.value.code == 400, "INVALID_ARGUMENT maps to 400 through the transcoder"


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": {"text": "x\\ud800"}, "sampling": {"max_tokens": 2}}',  # a lone UTF-16 surrogate escape
        b'{"prompt": {"text": "caf\xe9"}, "sampling": {"max_tokens": 2}}',  # Latin-1, not UTF-8
        b'{"prompt": {"text": "x"}, "sampling": {"max_tokens": "many"}}',
        b'{"prompt": ',
        b"[1, 2]",
        b'{"no_such_field": 1}',
    ],
)
def test_malformed_rest_bodies_are_400_and_harm_nothing(edge, body):
    request = urllib.request.Request(f"http://{edge['address']}/rest/v1/complete", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400, caught.value.read()[:300]
    good = urllib.request.Request(f"http://{edge['address']}/rest/v1/complete", method="POST",
                                  data=json.dumps({"prompt": {"text": "ok"}, "sampling": {"max_tokens": 2}}).encode(),
                                  headers={"Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(good, timeout=60).read())["usage"]["completion_tokens"] == 2


def test_rest_callers_get_structured_outputs_through_transcoding(edge):
    """The contract's structured field in REST's JSON names (jsonSchema, regex, choice.options)."""
    def complete(structured: dict) -> dict:
        body = json.dumps({"prompt": {"text": "Status:"}, "cache_mode": "CACHE_MODE_NO_STORE",
                           "sampling": {"max_tokens": 40, "temperature": 0, "structured": structured}}).encode()
        request = urllib.request.Request(f"http://{edge['address']}/rest/v1/complete", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        return json.loads(urllib.request.urlopen(request, timeout=60).read())

    schema = {"type": "object", "properties": {"status": {"enum": ["open", "paid"]}}, "required": ["status"],
              "additionalProperties": False}
    assert json.loads(complete({"jsonSchema": json.dumps(schema)})["text"])["status"] in ("open", "paid")
    assert complete({"choice": {"options": ["open", "paid"]}})["text"] in ("open", "paid")
    with pytest.raises(urllib.error.HTTPError) as caught:
        complete({"regex": "(?<=x)y"})
    assert caught.value.code == 400


def test_requests_survive_one_gateway_being_stopped(edge):
    with grpc.insecure_channel(edge["address"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert stub.Complete(greedy("import sys"), timeout=60).text
        edge["second"].stop()  # SIGTERM: one replica goes away
        results = [stub.Complete(greedy(f"import module_{i}", 6), timeout=60) for i in range(12)]
    assert all(r.finish_reason == common_pb2.FINISH_REASON_LENGTH for r in results)


def self_signed(tmp) -> tuple:
    """A certificate and key for 127.0.0.1 / localhost (what `moemesh certs` will make for a local mesh)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp / "edge.crt", tmp / "edge.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_envoy_terminates_tls(edge):
    tmp = edge["tmp"]
    cert, key = self_signed(tmp)
    port, admin = free_port(), free_port()
    settings = EnvoySettings(gateways=[edge["mesh"].gateway], port=port, admin_port=admin, tls_cert=cert, tls_key=key,
                             descriptor_set=tmp / "moemesh.pb")
    config = write_config(settings, tmp / "envoy-tls.json")
    with open(tmp / "envoy-tls.log", "wb") as log:
        envoy = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
                                 stdout=log, stderr=log)
    try:
        wait_listening(port)
        time.sleep(1.0)
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            reply = generation_pb2_grpc.GenerationStub(channel).Complete(greedy("import ssl", 6), timeout=60)
        assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH and reply.text
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.RpcError):
                generation_pb2_grpc.GenerationStub(plain).Complete(greedy("import ssl", 6), timeout=5)
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)
