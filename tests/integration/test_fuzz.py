"""Property-based fuzzing of the public request shapes, over gRPC and HTTP, against a real mesh.

Whatever a caller sends, only documented outcomes come back (OK or a precise
client-error status; never INTERNAL / UNKNOWN / HTTP 500), and the service
stays healthy.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moemesh.v1 import common_pb2, embeddings_pb2, embeddings_pb2_grpc, generation_pb2, generation_pb2_grpc

DOCUMENTED_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
DOCUMENTED_HTTP = {200, 400, 404, 413, 429, 503, 504}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])


@pytest.fixture(scope="module")
def mesh(traced_mesh):
    """The run's shared demo mesh (tests/conftest.py): fuzzing it with tracing on exercises that path too."""
    return traced_mesh


@pytest.fixture(scope="module")
def channel(mesh):
    with grpc.insecure_channel(mesh.gateway) as ch:
        yield ch


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
texts = st.text(max_size=200)
small_ints = st.one_of(st.integers(-5, 40), st.integers(-(2**31), 2**31 - 1))


@st.composite
def sampling_params(draw) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams()
    params.max_tokens = draw(st.one_of(st.integers(-3, 8), st.integers(-(2**31), 2**31 - 1)))
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(params, name, draw(floats))
    if draw(st.booleans()):
        params.top_k = draw(small_ints)
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**63 - 1))
    params.stop.extend(draw(st.lists(st.text(max_size=40), max_size=10)))
    params.stop_token_ids.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5)))
    if draw(st.booleans()):
        params.logprobs = draw(small_ints)
    params.ignore_eos = draw(st.booleans())
    return params


@st.composite
def generate_requests(draw) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(model=draw(st.sampled_from(["", "demo-moe", "no-such-model", "x" * 300])),
                                             sampling=draw(sampling_params()))
    if draw(st.booleans()):
        request.prompt.text = draw(texts)
    else:
        for _ in range(draw(st.integers(0, 3))):
            request.prompt.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "", "robot"])),
                                             content=draw(texts))
    request.priority = draw(st.integers(-3, 12))
    request.request_id = draw(st.sampled_from(["", "abc-1", "bad id!", "x" * 200]))
    request.cache_mode = common_pb2.CACHE_MODE_NO_STORE
    return request


@FUZZ
@given(request=generate_requests())
def test_grpc_generate_returns_only_documented_codes(channel, request):
    request.sampling.max_tokens = min(request.sampling.max_tokens, 4) if request.sampling.max_tokens > 0 else \
        request.sampling.max_tokens
    try:
        events = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=30))
        assert events and events[-1].finish_reason
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED_GRPC, f"{exc.code()}: {exc.details()}"
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert exc.details().split(":")[0], "the message names the field"


@FUZZ
@given(inputs=st.lists(texts, max_size=6), model=st.sampled_from(["", "all-minilm-l6-v2", "nope"]))
def test_grpc_embed_returns_only_documented_codes(channel, inputs, model):
    try:
        reply = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(model=model, inputs=inputs), timeout=30)
        assert len(reply.embeddings) == len(inputs)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED_GRPC, f"{exc.code()}: {exc.details()}"


# JSON text may also hold lone UTF-16 surrogate escapes, which no protobuf string can: json.dumps writes "\\ud800".
surrogates = st.sampled_from([chr(unit) for unit in (0xD800, 0xDBFF, 0xD83D, 0xDC00, 0xDE00, 0xDFFF)])
http_texts = st.one_of(texts, st.text(alphabet=st.one_of(surrogates, st.characters()), max_size=6))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=30), http_texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def chat_bodies(draw) -> dict:
    body = draw(st.dictionaries(st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop",
                                                 "seed", "stream", "logprobs", "top_logprobs", "presence_penalty"]),
                                json_values, max_size=8))
    if draw(st.booleans()):
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "bot"])), "content": draw(http_texts)}]
        body["max_tokens"] = draw(st.integers(-2, 4))
    return body


@FUZZ
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), body=chat_bodies())
def test_http_routes_return_only_documented_statuses(mesh, path, body):
    raw = json.dumps(body, allow_nan=False).encode()
    request = urllib.request.Request(f"http://{mesh.http}{path}", data=raw, method="POST",
                                     headers={"Content-Type": "application/json", "Cache-Control": "no-store"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, payload = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    assert status in DOCUMENTED_HTTP, f"{status}: {payload[:300]!r}"
    if status != 200:
        assert "error" in json.loads(payload), "errors come in OpenAI's shape"


@FUZZ
@given(raw=st.binary(max_size=300))
def test_http_garbage_bodies_are_client_errors(mesh, raw):
    request = urllib.request.Request(f"http://{mesh.http}/v1/chat/completions", data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=30)
        status = 200
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status in {400, 413}


def test_the_mesh_is_healthy_after_the_fuzzing(mesh, channel):
    assert json.loads(urllib.request.urlopen(f"http://{mesh.http}/healthz", timeout=10).read())["status"] == "ok"
    reply = generation_pb2_grpc.GenerationStub(channel).Complete(generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(text="def ok():"), sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0)),
        timeout=30)
    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH and not math.isnan(reply.timings.total)
