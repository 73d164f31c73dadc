"""Resumable streams through a real mesh: reconnect with the same request id and offset, without a second generation."""

from __future__ import annotations

import grpc
import pytest

from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.support.mesh import routed_requests

FP = "1" * 32  # a request's fingerprint (gateway.generation.fingerprint): the same for every call here


@pytest.fixture(scope="module")
def mesh(traced_mesh):
    """The run's shared demo mesh (tests/conftest.py)."""
    return traced_mesh


def request(request_id: str = "", resume_from: int = 0) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        request_id=request_id, resume_from_index=resume_from, cache_mode=common_pb2.CACHE_MODE_NO_STORE,
        prompt=common_pb2.Prompt(text="def reconcile(ledger, statement):"),
        sampling=common_pb2.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True))


def test_a_dropped_stream_resumes_from_its_offset_without_a_second_generation(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        reference = list(stub.Generate(request(), timeout=60))
        before = routed_requests(mesh)
        call = stub.Generate(request("order-1"), timeout=60)
        head = [next(call) for _ in range(5)]
        call.cancel()  # the connection drops after 5 events
        rest = list(stub.Generate(request("order-1", resume_from=5), timeout=60))
    assert [e.index for e in head + rest] == list(range(len(head) + len(rest)))
    assert "".join(e.text for e in head + rest) == "".join(e.text for e in reference)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 120
    assert all(e.request_id == "order-1" for e in head + rest)
    assert routed_requests(mesh) == before + 1, "resuming must not start a second generation"


def test_an_identical_retry_of_a_finished_request_replays_the_same_answer(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        first = list(stub.Generate(request("invoice-7"), timeout=60))
        before = routed_requests(mesh)
        again = list(stub.Generate(request("invoice-7"), timeout=60))
    assert [(e.index, e.text, list(e.token_ids)) for e in again] == [(e.index, e.text, list(e.token_ids)) for e in first]
    assert routed_requests(mesh) == before, "a retry of a finished request is answered from the journal"


def test_an_id_reused_for_another_request_is_refused_and_a_resume_past_the_end_too(mesh):
    """Reusing an id (within the journal's lifetime) for another prompt, sampling or model once answered it with
    the first request's events; a retry may still change what does not change the answer."""
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        first = list(stub.Generate(request("order-77"), timeout=60))
        other_prompt = request("order-77")
        other_prompt.prompt.text = "SELECT * FROM invoices"
        other_sampling = request("order-77")
        other_sampling.sampling.max_tokens = 3
        other_model = request("order-77")
        other_model.model = "demo-moe-pooled"  # an embedding model: refused before the journal, naming `model`
        for changed, field in ((other_prompt, "request_id"), (other_sampling, "request_id"), (other_model, "model")):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(changed, timeout=60))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert caught.value.details().startswith(f"{field}: "), caught.value.details()
        retry = request("order-77")
        retry.priority, retry.cache_mode = 5, common_pb2.CACHE_MODE_DEFAULT
        assert [e.text for e in stub.Generate(retry, timeout=60)] == [e.text for e in first]
        assert list(stub.Generate(request("order-77", resume_from=len(first)), timeout=60)) == [], "nothing left"
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request("order-77", resume_from=len(first) + 1), timeout=60))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (f"resume_from_index: {len(first) + 1} is past the end of the stream, "
                                          f"which has {len(first)} events")


def test_requests_without_an_id_are_not_journaled(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        before = routed_requests(mesh)
        list(stub.Generate(request(), timeout=60))
        list(stub.Generate(request(), timeout=60))
    assert routed_requests(mesh) == before + 2


async def test_a_journal_whose_gateway_died_is_started_afresh_on_retry():
    import redis.asyncio as aioredis

    from moemesh.gateway.journal import Journal
    from moemesh.services.core.errors import Unavailable
    from moemesh.v1 import worker_pb2
    from tests.support.redis_server import RedisServer

    server = RedisServer()
    try:
        journal = Journal(aioredis.from_url(server.url, socket_timeout=5), block_ms=100)
        key = Journal.key("default", "po-9")
        assert await journal.claim(key, FP) is True
        await journal._append(key, worker_pb2.RequestEvent(text="half", token_ids=[1]))
        assert await journal.claim(key, FP) is False, "a live owner keeps its claim"
        await journal.client.delete(key + ":owner")  # its gateway died: the claim lapsed
        with pytest.raises(Unavailable):
            [e async for e in journal.follow(key)]
        assert await journal.claim(key, FP) is True, "a retry takes over"
        assert await journal.client.xlen(key) == 0, "and starts the journal afresh"
    finally:
        server.stop()
