"""What seeing into the mesh costs: throughput with traces and metrics on against both off, in one run.

Two meshes of the ~100M-parameter benchmark Mixtral (`bench.engine_bench` builds it) run side by side, taking
turns under the same load from an external OpenAI-SDK client (`bench.mesh_vs_engine`'s: streamed completions,
`--concurrency` in flight, 100-word prompts, `--new-tokens` greedy tokens with EOS ignored):

  - off: `moemesh up` with every metrics port off and no OTEL_* variable;
  - on:  `moemesh up` as it starts by default (metrics on) with traces exported over OTLP to a receiver in this
         process (every request sampled), and every service's /metrics scraped each `--scrape-interval` seconds.

While one mesh is loaded the other idles. It prints each side's output tokens/s per run, the ratio of the best
runs and of the run pairs' medians, and the cost (target: at most 3%). Usage:

    python -m bench.observability_bench [--concurrency 32] [--requests 64] [--repeats 6]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import threading
import urllib.request
from concurrent import futures

import grpc

from bench.engine_bench import build_checkpoint
from bench.mesh_vs_engine import run_client, word_prompts
from moemesh.local import RunningMesh, start_mesh, stop_mesh

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
OBSERVABILITY_ENV = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                     "OTEL_SDK_DISABLED", "MOEMESH_GATEWAY_METRICS_PORT", "MOEMESH_SCHEDULER_METRICS_PORT",
                     "MOEMESH_WORKER_METRICS_PORT")


class SpanSink:
    """An OTLP/gRPC endpoint that takes trace exports and counts their bytes without decoding them (a collector
    would run on another machine; this one should cost the benchmark's cores as little as it can)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.exports = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(self._export)  # raw bytes in, raw bytes out
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": handler}),))
        self.endpoint = f"http://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _export(self, request: bytes, context) -> bytes:
        with self._lock:
            self.bytes += len(request)
            self.exports += 1
        return b""  # an empty ExportTraceServiceResponse


class Scraper:
    """Scrapes every metrics endpoint of a mesh each `interval` seconds, as Prometheus would, until stopped."""

    def __init__(self, mesh: RunningMesh, interval: float) -> None:
        ready = mesh.ready
        self.addresses = [ready["gateway"]["metrics_address"], ready["scheduler"]["metrics_address"],
                          *(w["metrics_address"] for w in ready["workers"])]
        self.interval = interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for address in self.addresses:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
                    response.read()
            self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start(workdir: pathlib.Path, ckpt: pathlib.Path, env: dict[str, str]) -> RunningMesh:
    """`moemesh up --model ckpt` with `env` over this environment minus every observability setting."""
    saved = {k: os.environ.pop(k) for k in OBSERVABILITY_ENV if k in os.environ}
    os.environ.update(env)
    try:
        return start_mesh(workdir, "--no-embeddings", "--model", str(ckpt), quiet=True)
    finally:
        for key in env:
            os.environ.pop(key, None)
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=6)  # pairs: one run swings by 5-10% on a shared host
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    ckpt = build_checkpoint(args.workdir)
    prompts = word_prompts(args.requests, args.words)
    sink = SpanSink()
    off_env = {f"MOEMESH_{s}_METRICS_PORT": "off" for s in ("GATEWAY", "SCHEDULER", "WORKER")}
    on_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    print(f"checkpoint {ckpt}; {args.requests} requests, {args.concurrency} concurrent, {args.words}-word prompts "
          f"+ {args.new_tokens} tokens; metrics scraped every {args.scrape_interval:g} s when on")
    runs: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        meshes = {"off": start(pathlib.Path(tmp) / "off", ckpt, off_env),
                  "on": start(pathlib.Path(tmp) / "on", ckpt, on_env)}
        scraper = Scraper(meshes["on"], args.scrape_interval)
        try:
            assert all(meshes["on"].ready[s]["metrics_address"] for s in ("gateway", "scheduler"))
            assert not meshes["off"].ready["gateway"].get("metrics_address"), "metrics off in the 'off' mesh"
            for mesh in meshes.values():
                run_client(f"http://{mesh.http}/v1", prompts[:4], 4, 8)  # warm-up
            for repeat in range(args.repeats):  # alternating, each side first in turn
                order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
                for side in order:
                    result = run_client(f"http://{meshes[side].http}/v1", prompts, args.concurrency, args.new_tokens)
                    runs[side].append(result["tokens_per_s"])
                    print(f"  {side:3s} run {repeat + 1}: {result['tokens_per_s']:6.1f} tok/s, inter-token p50 "
                          f"{result['itl_p50'] * 1e3:.1f} ms", flush=True)
        finally:
            scraper.stop()
            for mesh in meshes.values():
                stop_mesh(mesh)
    sink.server.stop(None)
    best = max(runs["on"]) / max(runs["off"])
    pairs = statistics.median(on / off for on, off in zip(runs["on"], runs["off"]))
    print(f"off: {max(runs['off']):.1f} tok/s best; on (traces + metrics): {max(runs['on']):.1f} tok/s best; "
          f"{sink.exports} span exports, {sink.bytes / 1e6:.2f} MB; {scraper.scrapes} scrape rounds")
    print(f"on / off: best {best:.3f}, median of pairs {pairs:.3f}; cost {(1 - pairs) * 100:.1f}% "
          f"(target <= 3%)")


if __name__ == "__main__":
    main()
