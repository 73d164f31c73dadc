"""Response-cache hit latency through the gateway against a bare Redis GET, in one run.

Starts the local mesh (`moemesh up`, embedded Redis), stores one greedy
answer, then measures time to first token of repeated identical requests
(each answered from the cache) through the gateway's gRPC API, and the time
of a bare GET of a value of the same size on the same Redis.

Targets: hit p50 <= 3 ms, and <= 20x the bare GET.

Usage:

    python -m bench.cache_bench [--requests 300]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import grpc
import redis

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(pathlib.Path(tmp), "--no-http", "--no-embeddings", quiet=True)
        ready = mesh.ready
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
            stop_mesh(mesh)
    hit, get = statistics.median(hits), statistics.median(gets)
    print(f"cache hit through the gateway, time to first token: p50 {hit * 1000:.2f} ms, "
          f"p99 {sorted(hits)[int(0.99 * len(hits))] * 1000:.2f} ms (target p50 <= 3 ms)")
    print(f"bare Redis GET: p50 {get * 1000:.3f} ms; hit / GET = {hit / get:.1f}x (target <= 20x)")


if __name__ == "__main__":
    main()
