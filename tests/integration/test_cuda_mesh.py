"""The mesh on CUDA as a user starts it: `moemesh up --device cuda`, called over gRPC and the OpenAI HTTP API.

The worker runs the demo model in bfloat16 (the CUDA default) with its KV
pool sized from the GPU's free memory. On a machine without CUDA these
tests report as skipped (not applicable).
"""

from __future__ import annotations

import grpc
import pytest

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from moemesh.worker.engine.tokenizer import Tokenizer
from tests.support.mesh import DEMO_MODEL

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_mesh(tmp_path_factory):
    running = start_mesh(tmp_path_factory.mktemp("cuda-mesh"), "--device", "cuda", "--no-embeddings")
    yield running
    if running.process.poll() is None:
        stop_mesh(running)


def greedy(prompt: str, max_tokens: int = 24) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=prompt),
                                          sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_a_cuda_worker_sizes_its_kv_pool_from_gpu_memory_and_registers(cuda_mesh):
    logs = cuda_mesh.logs()
    assert "KV pool:" in logs and "GiB in use before it" in logs, f"no start-up line for the KV pool:\n{logs}"
    with grpc.insecure_channel(cuda_mesh.scheduler) as channel:
        nodes = scheduler_pb2_grpc.SchedulerStub(channel).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=10,
                                                                 metadata=cuda_mesh.internal_metadata).nodes
    assert [n.state for n in nodes] == ["ready"]
    assert nodes[0].load.free_kv_blocks > 1000, "the pool sized from GPU memory holds far more than one sequence"


def test_a_cuda_worker_streams_greedy_text_that_decodes_its_tokens_and_repeats(cuda_mesh):
    tokenizer = Tokenizer.from_dir(DEMO_MODEL)
    with grpc.insecure_channel(cuda_mesh.gateway) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        events = list(stub.Generate(greedy("def fibonacci(n):"), timeout=120))
        again = stub.Complete(greedy("def fibonacci(n):"), timeout=120)
        crowd = [stub.Generate(greedy(f"import os{i}", 16), timeout=120) for i in range(8)]
        crowd_texts = ["".join(e.text for e in call) for call in crowd]
    ids = [t for e in events for t in e.token_ids]
    text = "".join(e.text for e in events)
    assert len(events) >= 2 and len(ids) == 24 and events[-1].usage.completion_tokens == 24
    assert text == tokenizer.decode(ids), "streamed text must decode the streamed token ids"
    assert again.text == text, "a greedy request must give the same answer twice"
    assert all(crowd_texts), "eight concurrent streams must all produce text"


def test_the_openai_http_api_answers_from_a_cuda_worker(cuda_mesh):
    import httpx

    response = httpx.post(f"http://{cuda_mesh.http}/v1/completions", timeout=120,
                          json={"model": "demo-moe", "prompt": "class Stack:", "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 12 and body["choices"][0]["text"]
