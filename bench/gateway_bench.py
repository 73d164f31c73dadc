"""Gateway and Envoy overhead: the same requests straight to the scheduler, through the gateway, through Envoy.

Starts the local mesh and an Envoy in front of its gateway, then measures,
side by side in one run:

  - per request: latency of a 1-token greedy generation (p50), each path;
  - per streamed token: time per output token after the first, over five
    128-token streams (p50).

The direct path is the gateway's own scheduler client (one multiplexed
Dispatch stream) called in-process, so the difference is what the gateway
hop (and then Envoy) adds. Every request bypasses the response cache.

Usage:

    python -m bench.gateway_bench [--requests 200] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import subprocess
import tempfile
import time
import uuid

import grpc

from moemesh.cache.embedded import free_port
from moemesh.envoy import EnvoySettings, envoy_binary, write_config
from moemesh.local import start_mesh, stop_mesh
from moemesh.protos.generate import descriptor_set
from moemesh.services.scheduler.client import SchedulerClient
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc, worker_pb2

PROMPT = "def settle(invoice, payment):"


def sampling(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def via_scheduler(address: str, requests: int, new_tokens: int) -> tuple[list[float], list[float]]:
    client = SchedulerClient(address)
    client.start()
    await client.connected.wait()
    latencies, gaps = [], []

    async def run(max_tokens: int, record_gaps: bool) -> None:
        work = worker_pb2.GenerationWork(request_id=uuid.uuid4().hex, model="demo-moe",
                                         prompt=common_pb2.Prompt(text=PROMPT), sampling=sampling(max_tokens))
        start = time.perf_counter()
        first, tokens = None, 0
        async for event in client.generate(work):
            if event.token_ids and first is None:
                first = time.perf_counter()
            elif event.token_ids:
                tokens += len(event.token_ids)
        if record_gaps:
            gaps.append((time.perf_counter() - first) / max(tokens, 1))
        else:
            latencies.append(time.perf_counter() - start)

    await run(1, False)
    latencies.clear()
    for _ in range(requests):
        await run(1, False)
    for _ in range(5):
        await run(new_tokens, True)
    await client.close()
    return latencies, gaps


def via_grpc(address: str, requests: int, new_tokens: int) -> tuple[list[float], list[float]]:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        def request(max_tokens: int) -> generation_pb2.GenerateRequest:
            return generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=PROMPT), sampling=sampling(max_tokens),
                                                  cache_mode=common_pb2.CACHE_MODE_NO_STORE)

        list(stub.Generate(request(1), timeout=60))
        latencies = []
        for _ in range(requests):
            start = time.perf_counter()
            list(stub.Generate(request(1), timeout=60))
            latencies.append(time.perf_counter() - start)
        gaps = []
        for _ in range(5):
            first, tokens = None, 0
            for event in stub.Generate(request(new_tokens), timeout=120):
                if event.token_ids and first is None:
                    first = time.perf_counter()
                elif event.token_ids:
                    tokens += len(event.token_ids)
            gaps.append((time.perf_counter() - first) / max(tokens, 1))
    return latencies, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        mesh = start_mesh(tmp, "--no-http", "--no-embeddings", quiet=True)
        ready = mesh.ready
        envoy = None
        try:
            port = free_port()
            settings = EnvoySettings(gateways=[ready["gateway"]["address"]], port=port, admin_port=free_port(),
                                     descriptor_set=descriptor_set(tmp / "moemesh.pb"))
            config = write_config(settings, tmp / "envoy.json")
            envoy = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--use-dynamic-base-id",
                                      "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2.0)
            results = {
                "scheduler (direct)": asyncio.run(via_scheduler(ready["scheduler"]["address"], args.requests,
                                                                args.new_tokens)),
                "gateway": via_grpc(ready["gateway"]["address"], args.requests, args.new_tokens),
                "envoy -> gateway": via_grpc(f"127.0.0.1:{port}", args.requests, args.new_tokens),
            }
        finally:
            if envoy is not None:
                envoy.terminate()
                envoy.wait(timeout=30)
            stop_mesh(mesh)
    base_request = statistics.median(results["scheduler (direct)"][0])
    base_token = statistics.median(results["scheduler (direct)"][1])
    for name, (latencies, gaps) in results.items():
        request, token = statistics.median(latencies), statistics.median(gaps)
        print(f"{name:20s} 1-token request p50 {request * 1000:7.2f} ms (+{(request - base_request) * 1000:5.2f}),"
              f" per streamed token p50 {token * 1000:6.3f} ms (+{(token - base_token) * 1000:6.3f})")


if __name__ == "__main__":
    main()
