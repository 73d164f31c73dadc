"""How long a large embedding batch holds up the streams a worker is generating, and a short request sent meanwhile.

Starts `moemesh up --model M` (M: the ~100M benchmark Mixtral; `--model demo` for the demo model; the default
all-MiniLM-L6-v2 embeddings on), opens `--streams` greedy gRPC streams (EOS ignored, response cache bypassed),
and once they generate sends one embedding request of `--inputs` texts of 256 tokens (the model's limit) and,
a moment later, one 2-token completion. It reports how long the embedding took, the streams' gaps between
tokens while it ran (p50, p99, max), their tokens in that time, and the short completion's latency. The
worker runs an embedding batch one forward call at a time between engine steps (EmbeddingJob): the streams
wait one forward call, never the whole batch. Usage:

    python -m bench.embedding_stall [--streams 4] [--inputs 256] [--model DIR|demo]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import tempfile
import time

import grpc

from bench.engine_bench import bench_model
from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import (
    common_pb2,
    embeddings_pb2,
    embeddings_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

NO_STORE = common_pb2.CACHE_MODE_NO_STORE


async def stream_arrivals(stub, index: int, max_tokens: int, arrivals: list[float]) -> None:
    """One long greedy stream; the time of each event, until it is cancelled."""
    request = generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(text=f"def handler_{index}(request):\n    "), cache_mode=NO_STORE,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    try:
        async for _ in stub.Generate(request, timeout=900):
            arrivals.append(time.perf_counter())
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            print(f"stream {index}: {exc.code().name}: {exc.details()}")


async def measure(address: str, streams: int, inputs: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        models = (await models_pb2_grpc.ModelsStub(channel).ListModels(models_pb2.ListModelsRequest(), timeout=30)).models
        max_tokens = min(m.max_output_tokens for m in models if m.kind == models_pb2.MODEL_KIND_GENERATION) - 32
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        tasks = [asyncio.create_task(stream_arrivals(generation, i, max_tokens, a)) for i, a in enumerate(arrivals)]
        while min(len(a) for a in arrivals) < 8:
            await asyncio.sleep(0.01)
        texts = [f"{i} " + "ledger entry reconciled " * 120 for i in range(inputs)]  # truncated to 256 tokens
        started = time.perf_counter()
        embed = asyncio.ensure_future(embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(inputs=texts, cache_mode=NO_STORE), timeout=900))
        await asyncio.sleep(0.3)
        short_started = time.perf_counter()
        await generation.Complete(generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="def ok():"), cache_mode=NO_STORE,
            sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0)), timeout=900)
        short = time.perf_counter() - short_started
        reply = await embed
        ended = time.perf_counter()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps, tokens = [], 0
    for times in arrivals:
        during = [t for t in times if started <= t <= ended]
        tokens += len(during)
        gaps += [b - a for a, b in zip([started, *during], [*during, ended])]
    gaps.sort()
    print(f"embedding of {inputs} inputs ({reply.usage.prompt_tokens} tokens): {ended - started:.2f} s, beside "
          f"{streams} generating streams")
    print(f"the streams' gaps while it ran: p50 {statistics.median(gaps) * 1e3:.0f} ms, "
          f"p99 {gaps[int(len(gaps) * 0.99)] * 1e3:.0f} ms, max {gaps[-1] * 1e3:.0f} ms; "
          f"{tokens} tokens in that time")
    print(f"a 2-token completion sent 0.3 s into it: {short * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--model", default="", help="checkpoint directory, or 'demo' [default: the benchmark Mixtral]")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    model = bench_model(args.model, args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(pathlib.Path(tmp), "--no-http", "--model", str(model), quiet=True)
        try:
            asyncio.run(measure(mesh.gateway, args.streams, args.inputs))
        finally:
            stop_mesh(mesh)


if __name__ == "__main__":
    main()
