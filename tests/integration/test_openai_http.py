"""The OpenAI-compatible HTTP API: the official `openai` SDK against a real mesh, and the error, deadline and
disconnect paths against a scripted scheduler client."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import grpc
import httpx
import numpy as np
import openai
import pytest

from moemesh.services.core.errors import DeadlineExceeded, Overloaded, Unavailable
from moemesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
)
from tests.support.scripted import scripted_app

MODEL = "demo-moe"
EMBEDDING_MODEL = "all-minilm-l6-v2"
PROMPT = "def fibonacci(n):"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Write a loop."}]


# ---- against a real mesh -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(traced_mesh):
    """The run's shared demo mesh (tests/conftest.py; its metrics count client disconnects)."""
    return traced_mesh


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=f"http://{mesh.http}/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def grpc_complete(stub, prompt: common_pb2.Prompt, max_tokens: int) -> generation_pb2.CompleteResponse:
    request = generation_pb2.GenerateRequest(
        model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return stub.Complete(request, timeout=60)


def chat_prompt(messages: list[dict]) -> common_pb2.Prompt:
    return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in messages]))


def assert_healthy(mesh) -> None:
    assert httpx.get(f"http://{mesh.http}/healthz", timeout=10).json() == {"status": "ok"}
    # vLLM's and TGI's health route, which tools such as guidellm probe before they start: ready means 200.
    assert httpx.get(f"http://{mesh.http}/health", timeout=10).json()["status"] == "ready"


FINISH = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop"}


def test_completion_is_the_grpc_greedy_text_with_its_usage(client, stub):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = grpc_complete(stub, common_pb2.Prompt(text=PROMPT), 12)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == MODEL and reply.id.startswith("cmpl-")
    assert choice.text == expected.text and choice.index == 0
    assert choice.finish_reason == FINISH[expected.finish_reason]
    assert reply.usage.completion_tokens == expected.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_stream_adds_up_to_the_whole_answer(client):
    # 48 tokens: a gateway that falls behind merges queued events (by design); a short answer could arrive whole.
    whole = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=48, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"Cache-Control": "no-store"}))  # generated, not replayed
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2, "a 48-token answer must arrive as a stream"
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_is_the_grpc_chat_text(client, stub):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    expected = grpc_complete(stub, chat_prompt(CHAT), 10)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == FINISH[expected.finish_reason] and choice.logprobs is None
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.completion_tokens == len(expected.token_ids)


def test_chat_stream_role_first_content_deltas_finish_and_a_usage_chunk(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    usage_chunk, finish_chunk = chunks[-1], chunks[-2]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert finish_chunk.choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == whole.choices[0].message.content


def test_raw_stream_is_server_sent_events_ending_with_done(mesh):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://{mesh.http}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_logprobs_with_two_alternatives(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.token == item.top_logprobs[0].token, "greedy picks the most likely token"


def test_completion_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert all(token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))


def test_embeddings_float_and_base64_are_the_same_vectors(client):
    texts = ["hello world", "invoice overdue"]
    floats = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="float")
    encoded = client.embeddings.create(model=EMBEDDING_MODEL, input=texts, encoding_format="base64")
    default = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)  # the SDK asks for base64 and decodes
    one = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[0], encoding_format="float")
    assert floats.object == "list" and floats.model == EMBEDDING_MODEL
    assert [d.index for d in floats.data] == [0, 1]
    for i, item in enumerate(floats.data):
        assert len(item.embedding) == 384
        decoded = np.frombuffer(base64.b64decode(encoded.data[i].embedding), dtype="<f4")
        assert decoded.tolist() == item.embedding == default.data[i].embedding
    assert one.data[0].embedding == floats.data[0].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > one.usage.prompt_tokens > 0


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and EMBEDDING_MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"model": "no-such-model"}, "model"),
        ({"stop": ["x"] * 9}, "stop"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
    ],
)
def test_bad_chat_requests_are_bad_request_errors_naming_the_field(client, mesh, kwargs, param):
    request = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == 400 and caught.value.param == param, caught.value.body
    assert caught.value.type == "invalid_request_error"
    assert caught.value.body["message"].startswith(f"{param}: ")
    assert_healthy(mesh)


def test_bad_completion_and_embedding_requests(client, mesh):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)
    assert caught.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x = 1\n" * 2000, max_tokens=4, stream=True)
    assert caught.value.param == "prompt", "the worker's context check, refused before the stream starts"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBEDDING_MODEL, input=["fine", " "])
    assert caught.value.param == "input[1]"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="no-such-model", input="x")
    assert caught.value.param == "model"
    assert_healthy(mesh)


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"model": "demo-moe", "prompt": "x",', None),
        (b"[1, 2]", None),
        (b'{"model": "demo-moe", "prompt": "x", "n": 17}', "n"),
        (b'{"model": "demo-moe", "prompt": [[1, 2]]}', "prompt"),
        (b'{"model": "demo-moe", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
    ],
)
def test_raw_bad_bodies_are_400_in_the_openai_error_shape(mesh, content, param):
    response = httpx.post(f"http://{mesh.http}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert_healthy(mesh)


@pytest.mark.parametrize(
    ("path", "content", "escape"),
    [
        ("/v1/completions", b'{"model": "demo-moe", "prompt": "x\\ud800", "max_tokens": 2}', "\\ud800"),
        ("/v1/chat/completions",
         b'{"model": "demo-moe", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', "\\udfff"),
        ("/v1/chat/completions", b'{"model": "demo-moe", "messages": [{"role": "user", "content": "hi"}], '
                                 b'"max_tokens": 2, "stop": ["\\ud83d\\n"]}', "\\ud83d"),
        ("/v1/embeddings", b'{"model": "all-minilm-l6-v2", "input": ["fine", "\\ud800\\ud800"]}', "\\ud800"),
        ("/v1/completions", b'{"model": "demo-moe", "prompt": "x", "user": "\\udc00"}', "\\udc00"),
        ("/v1/completions", b'{"model": "demo-moe", "\\ud800": 1, "prompt": "x"}', "\\ud800"),
    ],
)
def test_lone_surrogate_escapes_are_malformed_json_not_a_500(mesh, path, content, escape):
    """A \\uD800-\\uDFFF escape without its other half decodes to a string no codec can write; it once failed the
    request deep in the gateway with a 500 (and the connection after it)."""
    response = httpx.post(f"http://{mesh.http}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    position = content.decode().index(escape)
    assert error["message"].startswith(f"malformed JSON body at position {position}: "), error
    assert "surrogate" in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert_healthy(mesh)


def test_bodies_that_are_not_utf8_are_malformed_json(mesh):
    latin1 = '{"model": "demo-moe", "prompt": "caf\xe9"}'.encode("latin-1")
    for content, position in ((latin1, latin1.index(b"\xe9")), ('{"model": "demo-moe"}'.encode("utf-16"), 0)):
        response = httpx.post(f"http://{mesh.http}/v1/completions", content=content,
                              headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"].startswith(f"malformed JSON body at position {position}: "
                                                              "the body is not UTF-8 (byte 0x"), response.text


def test_escaped_surrogate_pairs_are_text(client, mesh):
    """How json.dumps writes an emoji by default: a pair of escapes, valid, one character."""
    content = json.dumps({"model": MODEL, "prompt": "smile \U0001F600", "max_tokens": 2, "temperature": 0}).encode()
    assert b"\\ud83d\\ude00" in content
    response = httpx.post(f"http://{mesh.http}/v1/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 200, response.text
    same = client.completions.create(model=MODEL, prompt="smile \U0001F600", max_tokens=2, temperature=0)
    assert response.json()["choices"][0]["text"] == same.choices[0].text


def test_request_timeout_header_is_the_deadline(mesh):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    started = time.monotonic()
    response = httpx.post(f"http://{mesh.http}/v1/completions", json=body, headers={"X-Request-Timeout": "0.3"},
                          timeout=60)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - started < 5
    bad = httpx.post(f"http://{mesh.http}/v1/completions", json=body, headers={"X-Request-Timeout": "soon"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"


def nodes(mesh) -> list:
    with grpc.insecure_channel(mesh.scheduler) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10,
                                                                 metadata=mesh.internal_metadata).nodes


def client_disconnects(mesh) -> float:
    body = urllib.request.urlopen(f"http://{mesh.ready['scheduler']['metrics_address']}/metrics", timeout=10).read()
    for line in body.decode().splitlines():
        if line.startswith("moemesh_scheduler_client_disconnects_total "):
            return float(line.split()[1])
    raise AssertionError("no client disconnect counter")


def test_client_disconnect_mid_stream_cancels_the_generation(mesh):
    before = client_disconnects(mesh)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://{mesh.http}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # held: dropping the iterator closes the connection
        assert next(line for line in lines if line.startswith("data: {"))
        assert sum(n.in_flight for n in nodes(mesh)) == 1, "the generation is under way"
    deadline = time.monotonic() + 10
    while sum(n.in_flight + n.load.running_seqs for n in nodes(mesh)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(n.in_flight + n.load.running_seqs for n in nodes(mesh)) == 0, "the generation outlived its client"
    assert client_disconnects(mesh) == before + 1, "the gateway must cancel the request upstream"
    assert_healthy(mesh)


# ---- against a scripted scheduler client -------------------------------------------------------------------------
def app_for(script):
    return scripted_app(script, max_request_bytes=4096)


def text_then(finish: int):
    async def script(work):
        yield worker_pb2.RequestEvent(request_id=work.request_id, text="ab", token_ids=[1, 2])
        yield worker_pb2.RequestEvent(request_id=work.request_id, text="c", token_ids=[3], finish_reason=finish,
                                      usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=3))
    return script


def failing(error: Exception):
    async def script(work):
        raise error
        yield  # an async generator

    return script


async def endless(work):
    while True:
        await asyncio.sleep(0.001)
        yield worker_pb2.RequestEvent(request_id=work.request_id, text="x", token_ids=[7])


async def post(app, path: str, body, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        return await http.post(path, json=body, headers=headers)


async def test_health_is_503_until_a_model_is_served_while_readyz_is_the_gateways_own_readiness():
    """/health, where vLLM-style tools and load balancers look before they send work, says whether work can be
    answered; /readyz (Kubernetes) only that the gateway is connected."""
    app, client = app_for(endless)
    catalogue, models = app.state.deps.catalogue, client.list_models
    listing = {"answer": models_pb2.ListModelsResponse()}  # the workers are still loading

    async def list_models(timeout: float = 5.0):
        if isinstance(listing["answer"], Exception):
            raise listing["answer"]
        return listing["answer"]

    client.list_models = list_models
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        assert (await http.get("/readyz")).status_code == 200
        response = await http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "no model served yet"
        listing["answer"] = await models()
        catalogue._fetched_at = float("-inf")  # no need to wait out the catalogue's refresh period here
        response = await http.get("/health")
        assert response.status_code == 200 and response.json()["status"] == "ready"
        listing["answer"] = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                                  grpc.aio.Metadata(), "scheduler gone")
        catalogue._fetched_at = float("-inf")
        assert (await http.get("/health")).status_code == 503, "an unreachable scheduler is no 500"
        client.connected.clear()
        response = await http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "not ready"
        assert (await http.get("/readyz")).status_code == 503


@pytest.mark.parametrize(
    ("error", "status", "type_"),
    [
        (Overloaded("queue full", retry_after=1.5), 429, "rate_limit_error"),
        (Unavailable("no replica"), 503, "service_unavailable_error"),
        (DeadlineExceeded("deadline passed before the request was queued"), 504, "timeout_error"),
    ],
)
async def test_mesh_errors_map_to_http_statuses(error, status, type_):
    app, _ = app_for(failing(error))
    for stream in (False, True):
        response = await post(app, "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "stream": stream})
        assert response.status_code == status, "a refusal before the first token is a status, streamed or not"
        assert response.json()["error"] == {"message": str(error), "type": type_, "param": None, "code": None}
        if status == 429:
            assert response.headers["retry-after"] == "2" and response.headers["retry-after-ms"] == "1500"


@pytest.mark.parametrize(
    ("finish", "status"),
    [(common_pb2.FINISH_REASON_ABORT, 503), (common_pb2.FINISH_REASON_DEADLINE, 504)],
)
async def test_aborted_or_expired_generation_is_an_error_not_an_answer(finish, status):
    app, _ = app_for(text_then(finish))
    response = await post(app, "/v1/completions", {"prompt": "hi"})
    assert response.status_code == status and "error" in response.json()
    streamed = await post(app, "/v1/completions", {"prompt": "hi", "stream": True})
    events = [json.loads(e.removeprefix("data: ")) for e in streamed.text.split("\n\n") if e]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["ab", "c"]
    assert events[-1]["error"]["type"] == ("timeout_error" if status == 504 else "service_unavailable_error")
    assert "[DONE]" not in streamed.text


@pytest.mark.parametrize(("finish", "reason"), [(common_pb2.FINISH_REASON_CONTEXT, "length"),
                                                (common_pb2.FINISH_REASON_STOP, "stop")])
async def test_finish_reasons(finish, reason):
    app, fake = app_for(text_then(finish))
    response = await post(app, "/v1/completions", {"prompt": "hi", "stop": "\n", "seed": 3, "top_k": 5})
    assert response.json()["choices"][0] == {"index": 0, "text": "abc", "finish_reason": reason, "logprobs": None}
    sampling = fake.works[0].sampling
    assert list(sampling.stop) == ["\n"] and sampling.seed == 3 and sampling.top_k == 5
    assert sampling.max_tokens == 16, "OpenAI's /v1/completions default"


async def test_timeout_header_becomes_the_work_deadline():
    app, fake = app_for(text_then(common_pb2.FINISH_REASON_LENGTH))
    assert (await post(app, "/v1/completions", {"prompt": "hi"}, {"X-Request-Timeout": "30"})).status_code == 200
    assert 29 < fake.works[0].deadline_unix - time.time() <= 30
    assert (await post(app, "/v1/completions", {"prompt": "hi"})).status_code == 200
    assert fake.works[1].deadline_unix == 0


async def test_too_large_body_is_413():
    app, _ = app_for(text_then(common_pb2.FINISH_REASON_LENGTH))
    response = await post(app, "/v1/completions", {"prompt": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


async def disconnect_after_first_body(app, body: dict) -> list[dict]:
    """Drive the ASGI app as a server would, with the client hanging up once a body chunk arrived (stream)
    or after 50 ms (whole answer)."""
    content = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]}
    incoming = [{"type": "http.request", "body": content, "more_body": False}]
    gone = asyncio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        try:
            await asyncio.wait_for(gone.wait(), 0.05)
        except TimeoutError:
            pass
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_the_upstream_generation(stream):
    app, fake = app_for(endless)
    await disconnect_after_first_body(app, {"prompt": "hi", "max_tokens": 64, "stream": stream})
    assert len(fake.works) == 1 and fake.closed == [fake.works[0].request_id]


def test_a_repeated_request_is_a_cache_hit_unless_cache_control_says_no(client):
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "cache me"}],
                                           max_tokens=6, temperature=0)
    again = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "cache me"}], max_tokens=6, temperature=0)
    assert again.parse().choices[0].message.content == first.choices[0].message.content
    assert again.parse().usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    fresh = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "cache me"}],
                                           max_tokens=6, temperature=0, extra_headers={"Cache-Control": "no-cache"})
    assert fresh.choices[0].message.content == first.choices[0].message.content
