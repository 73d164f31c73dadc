"""The scheduler through real processes: overload, queue deadlines, cancellation, drains, who may register.

Failover after kill -9 of a worker or of the scheduler is in test_faults.py, under 16 streams.
"""

from __future__ import annotations

import os
import signal
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
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.support.checkpoints import build_tiny_mixtral
from tests.support.mesh import Service, pid_alive

PROMPTS = [f"def handler_{i}(request):\n    " for i in range(8)]


def request(prompt: str, max_tokens: int) -> generation_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    # These tests are about the scheduler: every request must really run (no response cache, no single-flight).
    return generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=prompt), sampling=sampling,
                                          cache_mode=common_pb2.CACHE_MODE_NO_STORE)


def collect(events) -> dict:
    out = {"ids": [], "text": "", "finish": None, "indexes": [], "usage": None}
    for event in events:
        out["ids"] += event.token_ids
        out["text"] += event.text
        out["indexes"].append(event.index)
        if event.finish_reason:
            out["finish"], out["usage"] = event.finish_reason, event.usage
    return out


def nodes(mesh) -> list:
    with grpc.insecure_channel(mesh.scheduler) as ch:
        return scheduler_pb2_grpc.SchedulerStub(ch).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10,
                                                                 metadata=mesh.internal_metadata).nodes


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory):
    """One worker with one sequence slot, and a scheduler queue of 2: easy to fill."""
    env = {"MOEMESH_SCHEDULER_MAX_QUEUED_REQUESTS": "2", "MOEMESH_SCHEDULER_METRICS_PORT": "0",
           "MOEMESH_WORKER_METRICS_PORT": "0", "MOEMESH_SCHEDULER_EMBED_MAX_DELAY": "0.05"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mesh = start_mesh(tmp_path_factory.mktemp("small"), "--workers", "1", "--max-num-seqs", "1",
                          "--no-embeddings", "--no-http")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield mesh
    stop_mesh(mesh)


def wait_idle(mesh, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(n.in_flight == 0 and n.load.running_seqs == 0 for n in nodes(mesh)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the worker did not go idle: {nodes(mesh)}")


def test_overload_is_refused_fast_with_a_retry_hint_and_the_rest_complete(small_mesh):
    wait_idle(small_mesh)
    results, errors = {}, {}

    def call(i: int) -> None:
        started = time.monotonic()
        try:
            with grpc.insecure_channel(small_mesh.gateway) as ch:
                out = collect(generation_pb2_grpc.GenerationStub(ch).Generate(request(PROMPTS[i], 120), timeout=120))
            results[i] = out
        except grpc.RpcError as exc:
            errors[i] = (exc.code(), exc.details(), time.monotonic() - started)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    # One slot running plus two queued can be admitted at a time; the rest are refused at once.
    assert errors, "8 concurrent requests against 1 slot and a queue of 2 must see refusals"
    for code, details, seconds in errors.values():
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "queue full" in details
        assert seconds < 2.0, f"a refusal must be immediate, took {seconds:.2f}s"
    assert results and all(r["finish"] == common_pb2.FINISH_REASON_LENGTH for r in results.values())
    assert len(results) + len(errors) == 8
    wait_idle(small_mesh)


def test_deadline_expires_in_the_queue_without_reaching_a_worker(small_mesh):
    wait_idle(small_mesh)
    before = sum(n.routed_requests for n in nodes(small_mesh))
    with grpc.insecure_channel(small_mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        long_call = stub.Generate(request(PROMPTS[0], 900), timeout=120)
        next(long_call)  # it holds the only slot
        # The short request's deadline must pass while the long one still runs, however fast this machine is:
        # a quarter of the long one's remaining time at its pace so far (0.5 s at most).
        started, received = time.monotonic(), 0
        while received < 20:
            received += len(next(long_call).token_ids)
        remaining = (900 - received) * (time.monotonic() - started) / received
        with pytest.raises(grpc.RpcError) as caught:
            collect(stub.Generate(request(PROMPTS[1], 10), timeout=min(0.5, remaining / 4)))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert collect(long_call)["finish"] == common_pb2.FINISH_REASON_LENGTH
    wait_idle(small_mesh)
    assert sum(n.routed_requests for n in nodes(small_mesh)) == before + 1, "the expired request must not be routed"


def test_cancelled_stream_frees_its_slot_for_the_next_request(small_mesh):
    wait_idle(small_mesh)
    with grpc.insecure_channel(small_mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        call = stub.Generate(request(PROMPTS[2], 1000), timeout=120)
        next(call)
        call.cancel()
        wait_idle(small_mesh, timeout=10)  # the worker aborted it: no slot held
        started = time.monotonic()
        out = collect(stub.Generate(request(PROMPTS[3], 8), timeout=30))
    assert out["finish"] == common_pb2.FINISH_REASON_LENGTH and len(out["ids"]) == 8
    assert time.monotonic() - started < 10


def scrape(address: str) -> dict[str, float]:
    """Unlabelled (or single-sample) metric values from a Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            values.setdefault(sample.name, sample.value)
    return values


def test_client_disconnects_and_engine_aborts_are_counted_and_agree(small_mesh):
    wait_idle(small_mesh)
    with grpc.insecure_channel(small_mesh.gateway) as ch:
        call = generation_pb2_grpc.GenerationStub(ch).Generate(request(PROMPTS[4], 1000), timeout=120)
        next(call)
        call.cancel()
    wait_idle(small_mesh, timeout=10)
    scheduler = scrape(small_mesh.ready["scheduler"]["metrics_address"])
    worker = scrape(small_mesh.ready["workers"][0]["metrics_address"])
    disconnects = scheduler["moemesh_scheduler_client_disconnects_total"]
    assert disconnects >= 1
    assert scheduler["moemesh_scheduler_engine_aborts_total"] == disconnects
    assert worker["moemesh_worker_aborts_total"] == disconnects
    assert worker["moemesh_worker_generated_tokens_total"] > 0
    assert worker["moemesh_worker_free_kv_blocks"] == worker["moemesh_worker_kv_blocks"]


def test_embedding_requests_of_many_callers_share_worker_calls(small_mesh):
    texts = [f"record {i}: invoice overdue" for i in range(8)]
    with grpc.insecure_channel(small_mesh.gateway) as ch:
        stub = embeddings_pb2_grpc.EmbeddingsStub(ch)
        solo = [list(stub.Embed(embed_request(t), timeout=30).embeddings[0].values) for t in texts]
        before = scrape(small_mesh.ready["scheduler"]["metrics_address"])
        together: dict[int, list[float]] = {}

        def call(i: int) -> None:
            together[i] = list(stub.Embed(embed_request(texts[i]), timeout=30).embeddings[0].values)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    after = scrape(small_mesh.ready["scheduler"]["metrics_address"])
    requests = after["moemesh_scheduler_embed_requests_total"] - before["moemesh_scheduler_embed_requests_total"]
    calls = after["moemesh_scheduler_embed_worker_calls_total"] - before["moemesh_scheduler_embed_worker_calls_total"]
    assert requests == 8 and calls < 8, f"8 concurrent requests took {calls} worker calls"
    for i in range(8):
        assert max(abs(a - b) for a, b in zip(together[i], solo[i])) < 1e-5, f"caller {i} got another row"


def test_the_workers_write_prompt_blocks_to_the_shared_redis_tier(small_mesh):
    prompt = "class InvoiceRepository:\n    def find_overdue(self, customer_id, since):\n        " * 4
    with grpc.insecure_channel(small_mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        # Twice: the second is a local prefix hit, which shows the prefix recurs and writes it to the tier.
        first = collect(stub.Generate(request(prompt, 4), timeout=60))
        second = collect(stub.Generate(request(prompt, 4), timeout=60))
    deadline = time.monotonic() + 60  # the tier's writer thread runs at nice 19: on a busy host it waits its turn
    while time.monotonic() < deadline:
        worker = scrape(small_mesh.ready["workers"][0]["metrics_address"])
        if worker.get("moemesh_kv_tier_stored_blocks_total", 0) > 0:
            break
        time.sleep(0.1)
    assert worker["moemesh_kv_tier_stored_blocks_total"] > 0 and worker["moemesh_kv_tier_written_bytes_total"] > 0
    assert first["usage"].prompt_tokens >= 32 and second["usage"].cached_tokens >= 16


def embed_request(text: str) -> embeddings_pb2.EmbedRequest:
    return embeddings_pb2.EmbedRequest(model="demo-moe-pooled", inputs=[text], cache_mode=common_pb2.CACHE_MODE_NO_STORE)


def test_the_mesh_is_still_whole_after_the_scheduler_tests(small_mesh):
    assert all(pid_alive(pid) for pid in small_mesh.service_pids())


@pytest.mark.slow
def test_sigterm_drains_a_worker_its_streams_finish_and_new_work_goes_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_SCHEDULER_AFFINITY_LOAD_GUARD", "0")
    # A model with peaked logits: the drained streams run in other batches than the clean ones, and 4 x 600 greedy
    # tokens of a model with near-ties could differ by batch composition alone. 600 tokens take half a second here.
    checkpoint = build_tiny_mixtral(tmp_path / "ckpt", max_position_embeddings=1024)
    mesh = start_mesh(tmp_path / "mesh", "--model", str(checkpoint), "--workers", "2", "--no-embeddings", "--no-http")
    try:
        with grpc.insecure_channel(mesh.gateway) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            undisturbed = [stub.Generate(request(p, 600), timeout=120) for p in PROMPTS[:4]]  # all at once
            clean = [collect(call) for call in undisturbed]
            calls = [stub.Generate(request(p, 600), timeout=120) for p in PROMPTS[:4]]
            # The victim is whichever worker the router gave the most streams (it may have given one all four), taken
            # the moment all four are routed: waiting for their first tokens first could see them finished.
            deadline, held = time.monotonic() + 30, nodes(mesh)
            while sum(n.in_flight for n in held) < len(calls) and time.monotonic() < deadline:
                time.sleep(0.002)
                held = nodes(mesh)
            busiest = max(held, key=lambda n: n.in_flight)
            assert sum(n.in_flight for n in held) == len(calls), f"the four streams must be running: {held}"
            victim, survivor = sorted(mesh.ready["workers"], key=lambda w: w["address"] != busiest.address)
            os.kill(victim["pid"], signal.SIGTERM)
            late = collect(stub.Generate(request(PROMPTS[5], 16), timeout=60))  # during the drain
            drained = [collect(call) for call in calls]
        assert late["finish"] == common_pb2.FINISH_REASON_LENGTH
        assert [d["ids"] for d in drained] == [c["ids"] for c in clean]
        deadline = time.monotonic() + 30
        while pid_alive(victim["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(victim["pid"]), "the drained worker must exit"
        assert [n.address for n in nodes(mesh)] == [survivor["address"]], "it deregistered"
    finally:
        stop_mesh(mesh)


def test_only_nodes_with_the_cluster_token_may_register(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_SCHEDULER_CLUSTER_TOKEN", "s3cret-token")
    scheduler = Service("moemesh.services.scheduler.main", "--port", "0", log=tmp_path / "s.log")
    try:
        register = scheduler_pb2.RegisterRequest(node_id="n1", address="127.0.0.1:1")
        with grpc.insecure_channel(scheduler.info["address"]) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            for metadata in [(), (("authorization", "Bearer wrong"),)]:
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Register(register, metadata=metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Register(register, metadata=(("authorization", "Bearer s3cret-token"),), timeout=10)
            assert reply.lease_id
            beats = iter([scheduler_pb2.HeartbeatRequest(node_id="n1", lease_id=reply.lease_id)])
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Heartbeat(beats, timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        scheduler.stop()
