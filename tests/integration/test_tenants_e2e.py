"""Tenants through a real mesh: authentication, allow-lists, rate limits and cache scopes on both front doors."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import grpc
import httpx
import jwt
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.gateway.tenants import AUTH_FAILED, hash_line
from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc

MODEL = "demo-moe"
SECRET = "e2e-jwt-secret-e2e-jwt-secret-e2e-jwt-secret"
TENANTS = {
    "jwt": {"issuer": "https://auth.test", "audience": "moemesh", "algorithms": ["HS256"], "key": SECRET},
    "tenants": [
        {"id": "alpha", "api_key_hashes": [hash_line("alpha-key")], "priority": 2},
        {"id": "gamma", "api_key_hashes": [hash_line("gamma-key")]},
        {"id": "beta", "api_key_hashes": [hash_line("beta-key")], "allowed_models": ["demo-moe-pooled"]},
        {"id": "limited", "api_key_hashes": [hash_line("limited-key")], "requests_per_second": 0.1, "burst": 2},
        {"id": "capped", "api_key_hashes": [hash_line("capped-key")], "max_concurrent_requests": 2},
    ],
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenants")
    tenants_file = tmp / "tenants.json"
    tenants_file.write_text(json.dumps(TENANTS))
    assert "alpha-key" not in tenants_file.read_text()
    # The quota tests count what Redis decided; the default 100 ms can be overrun on a loaded host, and the check is
    # then decided in-process (a designed fallback, tested in test_ratelimit).
    env = {"MOEMESH_GATEWAY_TENANTS_FILE": str(tenants_file), "MOEMESH_GATEWAY_RATE_LIMIT_REDIS_TIMEOUT": "2"}
    os.environ.update(env)
    try:
        running = start_mesh(tmp, "--no-embeddings")
    finally:
        for name in env:
            del os.environ[name]
    yield running
    stop_mesh(running)


def request(text: str = "def tenant_test():", **sampling) -> generation_pb2.GenerateRequest:
    sampling.setdefault("max_tokens", 6)
    sampling.setdefault("temperature", 0.0)
    return generation_pb2.GenerateRequest(model=MODEL, prompt=common_pb2.Prompt(text=text),
                                          sampling=common_pb2.SamplingParams(**sampling))


def complete(mesh, key: str | None, req: generation_pb2.GenerateRequest | None = None, header: str = "authorization"):
    metadata = [] if key is None else [(header, f"Bearer {key}" if header == "authorization" else key)]
    with grpc.insecure_channel(mesh.gateway) as ch:
        return generation_pb2_grpc.GenerationStub(ch).Complete(req or request(), metadata=metadata, timeout=60)


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def sdk(mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{mesh.http}/v1", api_key=key, max_retries=0, timeout=60)


def test_grpc_without_a_valid_key_is_unauthenticated_with_one_message(mesh):
    missing = grpc_error(lambda: complete(mesh, None))
    wrong = grpc_error(lambda: complete(mesh, "not-a-key"))
    bad_jwt = grpc_error(lambda: complete(mesh, jwt.encode({"tenant": "alpha", "exp": 1}, SECRET)))
    for err in (missing, wrong, bad_jwt):
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == AUTH_FAILED
    with grpc.insecure_channel(mesh.gateway) as ch:
        err = grpc_error(lambda: models_pb2_grpc.ModelsStub(ch).ListModels(models_pb2.ListModelsRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health stays open


def test_http_without_a_valid_key_is_401_with_one_message(mesh):
    base = f"http://{mesh.http}"
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    missing = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    wrong = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    invalid_body = httpx.post(f"{base}/v1/completions", json={"nonsense": True}, timeout=30)
    for response in (missing, wrong, invalid_body):
        assert response.status_code == 401
        assert response.json()["error"] == {"message": AUTH_FAILED, "type": "authentication_error",
                                            "param": None, "code": None}
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
    with sdk(mesh, "wrong-key") as client, pytest.raises(openai.AuthenticationError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert err.value.status_code == 401 and AUTH_FAILED in str(err.value)


def test_an_allowed_key_works_over_grpc_and_the_openai_sdk(mesh):
    reply = complete(mesh, "alpha-key")
    assert reply.finish_reason and reply.usage.completion_tokens > 0
    assert complete(mesh, "alpha-key", header="x-api-key").finish_reason
    token = jwt.encode({"tenant": "alpha", "iss": "https://auth.test", "aud": "moemesh",
                        "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert complete(mesh, token).finish_reason  # a JWT names the tenant too
    with sdk(mesh, "alpha-key") as client:
        completion = client.completions.create(model=MODEL, prompt="def f():", max_tokens=4, temperature=0)
        assert completion.choices[0].finish_reason in ("stop", "length")
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].message.role == "assistant"
        assert MODEL in [m.id for m in client.models.list()]


def test_a_model_outside_the_allow_list_is_permission_denied(mesh):
    err = grpc_error(lambda: complete(mesh, "beta-key"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and MODEL in err.details()
    with sdk(mesh, "beta-key") as client:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert denied.value.status_code == 403
        assert [m.id for m in client.models.list()] == ["demo-moe-pooled"]  # only the allowed ones
        assert len(client.embeddings.create(model="demo-moe-pooled", input="x").data) == 1  # allowed: works
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(MODEL)
    with grpc.insecure_channel(mesh.gateway) as ch:
        listed = models_pb2_grpc.ModelsStub(ch).ListModels(models_pb2.ListModelsRequest(),
                                                            metadata=[("authorization", "Bearer beta-key")], timeout=10)
        assert [m.id for m in listed.models] == ["demo-moe-pooled"]
        listed = models_pb2_grpc.ModelsStub(ch).ListModels(models_pb2.ListModelsRequest(),
                                                            metadata=[("authorization", "Bearer alpha-key")], timeout=10)
        assert MODEL in [m.id for m in listed.models]


def test_exceeding_requests_per_second_is_resource_exhausted_with_a_retry_after(mesh):
    ok = 0
    for _ in range(2):
        ok += bool(complete(mesh, "limited-key").finish_reason)
    assert ok == 2  # the burst
    with grpc.insecure_channel(mesh.gateway) as ch:
        call = generation_pb2_grpc.GenerationStub(ch).Complete.with_call
        err = grpc_error(lambda: call(request(), metadata=[("authorization", "Bearer limited-key")], timeout=60))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.details()
    retry_ms = int(dict(err.trailing_metadata())["retry-after-ms"])
    assert 1000 < retry_ms <= 10_000  # one request refills in 10 s
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    details = rpc_status.from_call(err).details
    retry, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert details[0].Unpack(retry) and 1 < retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 <= 10
    assert details[1].Unpack(quota) and quota.violations[0].subject == "tenant"
    response = httpx.post(f"http://{mesh.http}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                          headers={"Authorization": "Bearer limited-key"}, timeout=30)
    assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["Retry-After"]) <= 10
    assert complete(mesh, "alpha-key").finish_reason, "another tenant is not limited"
    metrics = urllib.request.urlopen(f"http://{mesh.ready['gateway']['metrics_address']}/metrics", timeout=10).read()
    counted = {line.split()[0]: float(line.split()[1]) for line in metrics.decode().splitlines()
               if line.startswith(("moemesh_gateway_rate_limited_total", "moemesh_gateway_requests_total{"))}
    assert counted["moemesh_gateway_rate_limited_total"] >= 2, "both refusals are counted"
    assert counted['moemesh_gateway_requests_total{kind="generate",status="RESOURCE_EXHAUSTED"}'] >= 2


def test_a_tenant_over_its_concurrent_requests_is_refused_and_its_ended_requests_count_no_more(mesh):
    """max_concurrent_requests 2: two streams in progress, and a third request of any kind is refused at once
    (429 / RESOURCE_EXHAUSTED, nothing charged) while other tenants are served; a stream that ends, finished or
    cancelled, or a request refused part-way (n=3), holds nothing after."""
    capped = [("authorization", "Bearer capped-key")]
    long = request("def batch_job():", max_tokens=600, ignore_eos=True)
    base = f"http://{mesh.http}/v1"
    headers = {"Authorization": "Bearer capped-key"}
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        streams = [stub.Generate(long, metadata=capped, timeout=120) for _ in range(2)]
        assert all(next(s).index == 0 for s in streams), "both streams are generating"
        err = grpc_error(lambda: stub.Complete(request(), metadata=capped, timeout=60))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert err.details() == ("tenant 'capped' has 2 requests in progress, its limit (max_concurrent_requests); "
                                 "retry when one ends")
        refused = httpx.post(f"{base}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                             headers=headers, timeout=30)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text
        embed = httpx.post(f"{base}/embeddings", json={"model": "demo-moe-pooled", "input": "x"}, headers=headers,
                           timeout=30)
        assert embed.status_code == 429, "an embedding call counts as well"
        assert complete(mesh, "gamma-key").finish_reason, "another tenant is served meanwhile"
        streams[0].cancel()  # a client that goes away ends its request for the count
        deadline = time.monotonic() + 30
        while True:
            try:
                assert complete(mesh, "capped-key").finish_reason
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc
                time.sleep(0.1)
        assert sum(1 for _ in streams[1]) > 0  # runs to its end
    three = httpx.post(f"{base}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "n": 3},
                       headers=headers, timeout=30)
    assert three.status_code == 429, "the third choice is over the limit: the whole request is refused"
    with grpc.insecure_channel(mesh.gateway) as ch:  # and its first two choices hold nothing after
        stub = generation_pb2_grpc.GenerationStub(ch)
        again = [stub.Generate(long, metadata=capped, timeout=120) for _ in range(2)]
        assert all(next(s).index == 0 for s in again)
        for s in again:
            s.cancel()
    vectors = httpx.post(f"{base}/embeddings", json={"model": "demo-moe-pooled", "input": ["a", "b"]},
                         headers=headers, timeout=60)
    assert vectors.status_code == 200 and len(vectors.json()["data"]) == 2
    body = {"model": MODEL, "prompt": "def left(x):", "max_tokens": 600, "ignore_eos": True, "stream": True}
    for _ in range(3):  # HTTP streams whose clients hang up mid-answer: each gives its slot back
        with httpx.stream("POST", f"{base}/completions", json=body, headers=headers, timeout=60) as stream:
            assert stream.status_code == 200
            next(stream.iter_lines())
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(mesh.gateway) as ch:  # both slots free again: two streams at once
        stub = generation_pb2_grpc.GenerationStub(ch)
        while True:
            pair = [stub.Generate(request(f"def both_{i}():", max_tokens=600, ignore_eos=True), metadata=capped,
                                  timeout=60) for i in range(2)]
            try:
                assert all(next(s).index == 0 for s in pair)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc
                time.sleep(0.1)
            finally:
                for s in pair:
                    s.cancel()


def test_tenants_do_not_share_cached_answers(mesh):
    prompt = request("def scoped_by_tenant(x):", max_tokens=8)
    first = complete(mesh, "alpha-key", prompt)
    assert not first.usage.from_response_cache
    other = complete(mesh, "gamma-key", prompt)
    assert not other.usage.from_response_cache, "another tenant must not get alpha's cached answer"
    again = complete(mesh, "alpha-key", prompt)
    assert again.usage.from_response_cache and again.text == first.text
    assert complete(mesh, "gamma-key", prompt).usage.from_response_cache


def test_client_commands_authenticate_with_an_api_key_from_the_flag_or_the_environment(mesh):
    """`moemesh generate/models --api-key` (or MOEMESH_API_KEY) reach a gateway that requires a key."""
    import subprocess
    import sys

    def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moemesh.cli", *args, "--target", mesh.gateway],
                              capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "MOEMESH_API_KEY"} | (env or {}))

    refused = cli("models")
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    listed = cli("models", "--api-key", "gamma-key")
    assert listed.returncode == 0 and MODEL in listed.stdout
    generated = cli("generate", "def client():", "--max-tokens", "4", "--temperature", "0",
                    env={"MOEMESH_API_KEY": "beta-key"})
    assert generated.returncode == 1 and "PERMISSION_DENIED" in generated.stderr, "beta may not use demo-moe"
    generated = cli("generate", "def client():", "--max-tokens", "4", "--temperature", "0",
                    env={"MOEMESH_API_KEY": "alpha-key"})
    assert generated.returncode == 0 and "completion_tokens=4" in generated.stderr
