"""End to end: the mesh as `moemesh up` starts it, called over real gRPC."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from moemesh.worker.engine.kv_sizing import default_token_budget
from moemesh.worker.engine.tokenizer import Tokenizer
from tests.support.mesh import DEMO_MODEL, live, pid_alive

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def channel(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        yield ch


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(DEMO_MODEL)


def greedy_request(prompt: str = PROMPT, max_tokens: int = 24, **kwargs) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(text=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs),
    )


def test_stream_text_is_the_decoding_of_the_streamed_tokens(channel, tokenizer):
    # 64 tokens, generated (not replayed): a gateway that falls behind merges queued events (by design), and a short
    # answer on a loaded host could then arrive whole.
    request = greedy_request(max_tokens=64, ignore_eos=True)
    request.cache_mode = common_pb2.CACHE_MODE_NO_STORE
    events = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    assert len(events) >= 2, "a 64-token answer must arrive as a stream, not one message"
    token_ids = [t for e in events for t in e.token_ids]
    text = "".join(e.text for e in events)
    last = events[-1]
    assert text == tokenizer.decode(token_ids), "streamed text must decode the streamed token ids"
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and len(token_ids) == 64
    assert all(e.finish_reason == 0 for e in events[:-1]), "only the last event carries a finish reason"
    assert last.usage.completion_tokens == len(token_ids)
    assert last.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert last.timings.total >= last.timings.time_to_first_token > 0
    assert [e.index for e in events] == list(range(len(events)))
    assert len({e.request_id for e in events}) == 1 and events[0].request_id


def test_complete_equals_the_greedy_stream(channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    streamed = "".join(e.text for e in stub.Generate(greedy_request(), timeout=60))
    whole = stub.Complete(greedy_request(), timeout=60)
    assert whole.text == streamed
    assert whole.usage.completion_tokens == len(whole.token_ids)


def test_the_worker_sizes_its_kv_pool_and_sequence_limit_from_memory(mesh):
    """Started with no sizing flag, a worker serves 32 and more concurrent streams, and says so."""
    worker = mesh.ready["workers"][0]
    assert worker["max_num_seqs"] >= 32
    assert worker["kv_tokens"] >= worker["max_num_seqs"] * 256
    # The step's token budget follows the worker's compute threads on the CPU, and its log says so.
    threads = re.search(r"at most (\d+) tokens a step \(for (\d+) compute threads\)",
                        (mesh.log_dir / "worker-0.log").read_text())
    assert threads, "the worker logs its token budget"
    assert worker["max_num_batched_tokens"] == int(threads[1]) == default_token_budget("cpu", int(threads[2]))
    assert worker["max_num_batched_tokens"] >= worker["max_num_seqs"]


def test_concurrent_streams_all_complete(channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    calls = [stub.Generate(greedy_request(f"import os{i}", max_tokens=16), timeout=120) for i in range(6)]
    for call in calls:
        events = list(call)
        assert events[-1].finish_reason != 0
        assert events[-1].usage.completion_tokens == sum(len(e.token_ids) for e in events)


def test_chat_prompt_uses_the_template(channel):
    request = generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content="Write a loop.")])),
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    reply = generation_pb2_grpc.GenerationStub(channel).Complete(request, timeout=60)
    assert reply.usage.prompt_tokens > len("Write a loop.".split()), "the template adds role markers"
    assert reply.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="")), "prompt.text"),
        (generation_pb2.GenerateRequest(), "prompt"),
        (greedy_request(max_tokens=-1), "sampling.max_tokens"),
        (greedy_request(max_tokens=10**6), "sampling.max_tokens"),
        (generation_pb2.GenerateRequest(model="no-such-model", prompt=common_pb2.Prompt(text="x")), "model"),
        (generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="x"),
                                        sampling=common_pb2.SamplingParams(temperature=2.5)), "sampling.temperature"),
        (generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="x"),
                                        sampling=common_pb2.SamplingParams(top_p=0.0)), "sampling.top_p"),
        (generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="x"),
                                        sampling=common_pb2.SamplingParams(top_k=-1)), "sampling.top_k"),
        (greedy_request(stop=[f"s{i}" for i in range(20)]), "sampling.stop"),
        (greedy_request(stop=["x" * 500]), "sampling.stop[0]"),
        (generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="robot", content="hi")]))), "prompt.chat.messages[0].role"),
        (generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages())), "prompt"),
        (greedy_request("word " * 3000, max_tokens=4), "prompt"),  # longer than the model's context
        (greedy_request("x" * (5 * 1024 * 1024)), "request"),  # above max_request_bytes (4 MiB)
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(channel, request_, field):
    with pytest.raises(grpc.RpcError) as caught:
        list(generation_pb2_grpc.GenerationStub(channel).Generate(request_, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field), caught.value.details()


def test_a_request_with_invalid_utf8_is_invalid_argument_and_harms_nothing(channel):
    good = greedy_request("abc", max_tokens=2)
    raw = good.SerializeToString().replace(b"abc", b"a\xffc")  # a string field that is not UTF-8
    call = channel.unary_stream("/moemesh.v1.Generation/Generate", request_serializer=lambda b: b,
                                response_deserializer=generation_pb2.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        list(call(raw, timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("request")
    assert list(generation_pb2_grpc.GenerationStub(channel).Generate(good, timeout=30))[-1].finish_reason


def test_invalid_argument_carries_a_bad_request_field_violation(channel):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.RpcError) as caught:
        list(generation_pb2_grpc.GenerationStub(channel).Generate(greedy_request(max_tokens=-1), timeout=30))
    status = rpc_status.from_call(caught.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "sampling.max_tokens" and bad.field_violations[0].description

@pytest.mark.parametrize(("inputs", "field"), [([], "inputs"), (["ok", " "], "inputs[1]"), (["x"] * 300, "inputs")])
def test_bad_embedding_inputs_are_invalid_argument_naming_the_field(channel, inputs, field):
    with pytest.raises(grpc.RpcError) as caught:
        embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(embeddings_pb2.EmbedRequest(inputs=inputs), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field), caught.value.details()


def test_grpc_health_has_separate_liveness_and_readiness(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    ready = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    live = stub.Check(health_pb2.HealthCheckRequest(service="moemesh.liveness"), timeout=10)
    assert ready.status == live.status == health_pb2.HealthCheckResponse.SERVING

def test_embed_returns_unit_vectors_in_input_order(channel):
    stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
    reply = stub.Embed(embeddings_pb2.EmbedRequest(inputs=["hello world", "invoice overdue"]), timeout=60)
    assert reply.dimensions == 384 and [e.index for e in reply.embeddings] == [0, 1]
    for item in reply.embeddings:
        assert len(item.values) == 384
        assert abs(sum(v * v for v in item.values) - 1.0) < 1e-4
    assert reply.usage.prompt_tokens > 0


def test_pooled_moe_embeddings_are_a_second_embedding_model(channel):
    stub = embeddings_pb2_grpc.EmbeddingsStub(channel)
    texts = ["def parse(self, text):", "import os", "def parse(self, text):"]
    reply = stub.Embed(embeddings_pb2.EmbedRequest(model="demo-moe-pooled", inputs=texts), timeout=60)
    assert reply.model == "demo-moe-pooled" and reply.dimensions > 0
    vectors = [list(e.values) for e in reply.embeddings]
    assert all(abs(sum(v * v for v in vec) - 1.0) < 1e-4 for vec in vectors)
    assert vectors[0] == vectors[2], "the same text in one batch gives the same vector"
    assert vectors[0] != vectors[1]
    alone = stub.Embed(embeddings_pb2.EmbedRequest(model="demo-moe-pooled", inputs=[texts[1]]), timeout=60)
    assert max(abs(a - b) for a, b in zip(alone.embeddings[0].values, vectors[1])) < 1e-5, "batching changed a vector"


def test_a_large_embedding_batch_does_not_stall_the_generating_streams(channel):
    """The worker runs an embedding batch one forward call at a time between engine steps: run whole, 256 long
    inputs once held every stream of the worker for 10 s on the 2-core machine."""
    arrivals: list[float] = []
    stream = generation_pb2_grpc.GenerationStub(channel).Generate(
        greedy_request(max_tokens=900, ignore_eos=True), timeout=120)

    def read() -> None:
        try:
            arrivals.extend(time.monotonic() for _ in stream)
        except grpc.RpcError as exc:  # cancelled once the embedding is done
            assert exc.code() == grpc.StatusCode.CANCELLED, exc

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(arrivals) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    inputs = [f"{i} " + "ledger entry reconciled " * 120 for i in range(64)]  # 64 inputs, truncated to 256 tokens
    started = time.monotonic()
    reply = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
        embeddings_pb2.EmbedRequest(inputs=inputs, cache_mode=common_pb2.CACHE_MODE_NO_STORE), timeout=120)
    ended = time.monotonic()
    stream.cancel()
    reader.join(10)
    assert len(reply.embeddings) == 64 and reply.usage.prompt_tokens == 64 * 256
    during = [t for t in arrivals if started <= t <= ended]
    gaps = [b - a for a, b in zip([started, *during], [*during, ended])]
    assert len(during) >= 8, f"{len(during)} tokens arrived in the {ended - started:.2f} s the embedding took"
    assert max(gaps) < (ended - started) / 4, f"a {max(gaps):.2f} s gap in {ended - started:.2f} s of embedding"


def test_models_lists_the_demo_and_embedding_models(channel):
    reply = models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=10)
    kinds = {m.id: m.kind for m in reply.models}
    assert kinds.get("demo-moe") == models_pb2.MODEL_KIND_GENERATION
    assert models_pb2.MODEL_KIND_EMBEDDING in kinds.values()
    assert kinds.get("demo-moe-pooled") == models_pb2.MODEL_KIND_EMBEDDING
    demo = next(m for m in reply.models if m.id == "demo-moe")
    assert demo.architecture == "MixtralForCausalLM" and demo.ready_replicas == 1 and demo.max_context_tokens > 0


def test_every_service_is_healthy_and_reflects_its_services(mesh):
    expected = {
        mesh.gateway: {"moemesh.v1.Generation", "moemesh.v1.Embeddings", "moemesh.v1.Models"},
        mesh.scheduler: {"moemesh.v1.Scheduler"},
        mesh.workers[0]: {"moemesh.v1.Worker"},
    }
    for address, services in expected.items():
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ["", *services]:
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING, f"{address} {name!r} not serving"
            reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = {s.name for reply in replies for s in reply.list_services_response.service}
            assert services | {"grpc.health.v1.Health"} <= listed, f"{address} reflects {listed}"


def test_http_health_and_models(mesh):
    import httpx

    base = f"http://{mesh.http}"
    assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    deadline = time.monotonic() + 10  # one Redis PING with a short timeout: a loaded host may need another try
    while (ready := httpx.get(f"{base}/readyz", timeout=10)).json().get("redis") != "up" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "redis": "up"}, ready.text
    ids = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]]
    assert "demo-moe" in ids


def test_cli_generate_and_embed(mesh):
    run = [sys.executable, "-m", "moemesh.cli"]
    generated = subprocess.run([*run, "generate", "--target", mesh.gateway, "--max-tokens", "8", PROMPT],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    assert "completion_tokens=" in generated.stderr and generated.stdout.strip()
    embedded = subprocess.run([*run, "embed", "--target", mesh.gateway, "hello"],
                              capture_output=True, text=True, timeout=120)
    assert embedded.returncode == 0, embedded.stderr
    vector = json.loads(embedded.stdout.splitlines()[0])["embedding"]
    assert len(vector) == 384


def test_ctrl_c_finishes_in_flight_streams_then_stops_every_process(mesh, channel):
    """Runs last in this module: it stops the shared mesh."""
    pids = mesh.service_pids()
    ports = [int(a.rsplit(":", 1)[1]) for a in [mesh.gateway, mesh.scheduler, *mesh.workers, mesh.http]]
    redis_port = int(mesh.ready["redis"]["url"].rsplit(":", 1)[1].split("/")[0])
    # Short enough to finish within the gateway's shutdown grace (10 s) on a loaded host.
    request = greedy_request(max_tokens=80, ignore_eos=True)
    request.cache_mode = common_pb2.CACHE_MODE_NO_STORE  # a real generation, in flight when Ctrl-C arrives
    stream = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120)
    first = next(stream)  # the request is in flight when Ctrl-C arrives
    assert stop_mesh(mesh, signal.SIGINT) == 0, mesh.logs()
    rest = list(stream)
    assert rest and rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH, "in-flight stream was cut"
    assert len(first.token_ids) + sum(len(e.token_ids) for e in rest) == 80
    assert not [p for p in pids if pid_alive(p)], "a service outlived `moemesh up`"
    for port in [*ports, redis_port]:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


@pytest.mark.slow
def test_two_workers_register_and_share_the_traffic_and_die_with_the_supervisor(tmp_path, monkeypatch):
    # The 8 identical prompts share a prefix, so affinity would keep them on one replica
    # until the load guard trips; a zero guard makes load decide at once.
    monkeypatch.setenv("MOEMESH_SCHEDULER_AFFINITY_LOAD_GUARD", "0")
    mesh = start_mesh(tmp_path, "--workers", "2", "--no-embeddings", "--no-http")
    try:
        check_two_workers_share_the_traffic(mesh)
    finally:
        pids = mesh.service_pids()
        mesh.process.kill()  # SIGKILL: no chance to clean up; the kernel must stop the children
        mesh.process.wait(10)
    deadline = time.monotonic() + 30
    while [p for p in pids if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], "services must die with their supervisor"


def check_two_workers_share_the_traffic(mesh) -> None:
    assert len(mesh.workers) == 2 and len(set(mesh.workers)) == 2
    with grpc.insecure_channel(mesh.gateway) as ch:
        models = models_pb2_grpc.ModelsStub(ch).ListModels(models_pb2.ListModelsRequest(), timeout=10).models
        assert {m.id: m.ready_replicas for m in models} == {"demo-moe": 2, "demo-moe-pooled": 2}
        stub = generation_pb2_grpc.GenerationStub(ch)
        request = greedy_request(max_tokens=40, ignore_eos=True)
        request.cache_mode = common_pb2.CACHE_MODE_NO_STORE  # each one generates: no cache, no single-flight
        calls = [stub.Generate(request, timeout=120) for _ in range(8)]
        outputs = {"".join(e.text for e in call) for call in calls}
    with grpc.insecure_channel(mesh.scheduler) as sch:
        nodes = scheduler_pb2_grpc.SchedulerStub(sch).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10,
                                                                metadata=mesh.internal_metadata).nodes
    assert len(outputs) == 1, "the same greedy request must give the same text on either replica"
    assert all(live(n.state) for n in nodes), "both registered and serving"
    routed = sorted(n.routed_requests for n in nodes)
    assert sum(routed) == 8 and routed[0] >= 2, f"8 concurrent streams must spread over both replicas: {routed}"
    assert [n.in_flight for n in nodes] == [0, 0], "finished requests must leave the in-flight count"

