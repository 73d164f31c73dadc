"""Response-cache hit latency through the gateway against a bare Redis GET, in one run.

Starts the local mesh (`moemesh up`, embedded Redis), stores one greedy
answer, then measures time to first token of repeated identical requests
(each answered from the cache) through the gateway's gRPC API, and the time
of a bare GET of a value of the same size on the same Redis.

Targets: hit p50 <= 3 ms, and <= 20x the bare GET.

Usage:

    python bench/cache_bench.py [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
import redis

from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc


def start_mesh(workdir: pathlib.Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    """`moemesh up` on free ports (no HTTP, no MiniLM) plus `extra` flags; (process, ready-file contents)."""
    ready = workdir / "ready.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "moemesh.cli", "up", "--port", "0", "--no-http", "--no-embeddings",
         "--ready-file", str(ready), "--log-dir", str(workdir / "logs"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the mesh did not start")
        time.sleep(0.1)
    return process, json.loads(ready.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, ready = start_mesh(pathlib.Path(tmp))
        try:
            request = generation_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text="def reconcile(ledger, statement):"),
                sampling=common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True))
            with grpc.insecure_channel(ready["gateway"]["address"]) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                list(stub.Generate(request, timeout=60))  # generate and store
                hits, sizes = [], []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    call = stub.Generate(request, timeout=60)
                    first = next(call)
                    hits.append(time.perf_counter() - start)
                    last = list(call)[-1] if not first.finish_reason else first
                    assert last.usage.from_response_cache, "expected a cache hit"
                    sizes.append(len(first.text))
            client = redis.Redis.from_url(ready["redis"]["url"])
            value = b"x" * 2048
            client.set("moemesh:bench:value", value)
            gets = []
            for _ in range(args.requests):
                start = time.perf_counter()
                client.get("moemesh:bench:value")
                gets.append(time.perf_counter() - start)
        finally:
            process.terminate()
            process.wait(timeout=60)
    hit, get = statistics.median(hits), statistics.median(gets)
    print(f"cache hit through the gateway, time to first token: p50 {hit * 1000:.2f} ms, "
          f"p99 {sorted(hits)[int(0.99 * len(hits))] * 1000:.2f} ms (target p50 <= 3 ms)")
    print(f"bare Redis GET: p50 {get * 1000:.3f} ms; hit / GET = {hit / get:.1f}x (target <= 20x)")


if __name__ == "__main__":
    main()
