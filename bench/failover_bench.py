"""Failover timing: how long streams stall when their worker is killed mid-generation, and what they lose.

Starts `moemesh up --workers 2 --model M` (M: the ~100M benchmark Mixtral; `--model demo` for the demo
model), opens `--streams` greedy gRPC streams of `--new-tokens` tokens (EOS ignored, response cache
bypassed), and once every stream has delivered `--kill-after` tokens, kills one worker with SIGKILL. For
the streams that were on it, it reports the time from the kill to their next token (the failover stall),
p50 and max; for every stream, whether it finished with all its tokens, none repeated (the delivered token
count equals the usage the mesh reports). Usage:

    python -m bench.failover_bench [--streams 8] [--new-tokens 96] [--kill-after 16] [--model DIR|demo]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import statistics
import tempfile
import time

import grpc

from bench.engine_bench import bench_model
from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc


class Stream:
    """One generation's arrivals."""

    def __init__(self) -> None:
        self.times: list[float] = []  # one per token (an event's tokens share its arrival time)
        self.usage = 0
        self.finish = 0
        self.error = ""


async def run_stream(stub, index: int, new_tokens: int, stream: Stream) -> None:
    request = generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(text=f"def handler_{index}(request):\n    "),
        sampling=common_pb2.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
        cache_mode=common_pb2.CACHE_MODE_NO_STORE)
    try:
        async for event in stub.Generate(request, timeout=600):
            stream.times += [time.perf_counter()] * len(event.token_ids)
            if event.finish_reason:
                stream.finish, stream.usage = event.finish_reason, event.usage.completion_tokens
    except grpc.RpcError as exc:
        stream.error = f"{exc.code().name}: {exc.details()}"


async def measure(address: str, worker_pid: int, streams: int, new_tokens: int, kill_after: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        records = [Stream() for _ in range(streams)]
        tasks = [asyncio.create_task(run_stream(stub, i, new_tokens, r)) for i, r in enumerate(records)]
        while min(len(r.times) for r in records) < kill_after:
            await asyncio.sleep(0.01)
        killed_at = time.perf_counter()
        os.kill(worker_pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    stalls, intact = [], 0
    for r in records:
        before = [t for t in r.times if t <= killed_at]
        after = [t for t in r.times if t > killed_at]
        gaps = [b - a for a, b in zip(before[-8:], before[-7:])]
        typical = statistics.median(gaps) if gaps else 0.0
        if after and after[0] - killed_at > max(5 * typical, 0.2):  # its worker died: it waited to resume
            stalls.append(after[0] - killed_at)
        intact += not r.error and r.finish and len(r.times) == r.usage == new_tokens
    print(f"{streams} streams of {new_tokens} tokens; one of 2 workers killed (SIGKILL) after {kill_after} tokens each")
    print(f"streams that failed over: {len(stalls)}; stall from the kill to their next token: "
          + (f"p50 {statistics.median(stalls) * 1e3:.0f} ms, max {max(stalls) * 1e3:.0f} ms" if stalls else "-"))
    print(f"streams complete with exactly {new_tokens} tokens (none lost, none repeated): {intact} of {streams}")
    for r in records:
        if r.error:
            print(f"  error: {r.error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--kill-after", type=int, default=16)
    parser.add_argument("--model", default="", help="checkpoint directory, or 'demo' [default: the benchmark Mixtral]")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    model = bench_model(args.model, args.workdir)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(pathlib.Path(tmp), "--no-http", "--no-embeddings", "--workers", "2", "--model", str(model),
                          quiet=True)
        try:
            asyncio.run(measure(mesh.gateway, mesh.ready["workers"][0]["pid"], args.streams, args.new_tokens,
                                args.kill_after))
        finally:
            stop_mesh(mesh)


if __name__ == "__main__":
    main()
