"""Scheduler benchmarks: routing cost, heartbeat load, and the mesh against the in-process engine.

Three measurements, in one run (each can be skipped):

  1. routing: the dispatch decision (candidate filter + prefix-affinity /
     power-of-two pick) with 1,000 registered nodes: p50 and p99;
  2. heartbeats: a real scheduler process with 1,000 simulated nodes, each
     holding a heartbeat stream and beating at 1 Hz: the scheduler's CPU share;
  3. mesh: client -> gateway -> scheduler -> worker throughput at 32 streams
     against the engine in-process on the same checkpoint, and the latency
     the hops add per token at 1 stream (p50 of the client's inter-token gap
     minus p50 of the engine's own step time). The two sides alternate
     `--repeats` times and each keeps its best run: the machines are shared
     and noisy, and the least disturbed run is the fairest for both.

Usage:

    python -m bench.scheduler_bench [--nodes 1000] [--streams 32] [--new-tokens 128] [--model DIR|demo] [--skip-mesh]

The mesh comparison defaults to the ~100M-parameter Mixtral checkpoint that
bench/engine_bench.py builds (built here if missing). `--model demo` uses the
2.3M-parameter demo model instead, whose steps are so short (a millisecond or
two) that the per-token messaging cost of the hops shows at its worst.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from bench.engine_bench import bench_model
from moemesh.cache.embedded import free_port
from moemesh.local import RunningMesh, start_mesh, stop_mesh
from moemesh.services.scheduler.dispatcher import Dispatcher, Route
from moemesh.services.scheduler.registry import Load, Node, Registry, ServedModel
from moemesh.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    models_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
)

REPO = pathlib.Path(__file__).resolve().parent.parent

DEMO_MODEL = REPO / "worker" / "demo" / "demo-moe"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- 1. routing ---------------------------------------------------------------
def bench_routing(num_nodes: int, decisions: int = 20000) -> None:
    registry = Registry(heartbeat_interval=1.0, max_missed=3)
    model = ServedModel("m", "r", "generation")
    rng = random.Random(0)
    for i in range(num_nodes):
        node = Node(f"node-{i}", f"10.0.{i // 250}.{i % 250}:7000", (model,), f"node-{i}", max_num_seqs=64,
                    num_kv_blocks=4096)
        node.load = Load(running_seqs=rng.randint(0, 64), free_kv_blocks=rng.randint(0, 4096))
        node.in_flight = rng.randint(0, 63)
        registry.register(node)
    dispatcher = Dispatcher(registry, rng=rng)
    work = worker_pb2.GenerationWork(request_id="x", model="m", prompt=common_pb2.Prompt(text="You are a CRM bot. " * 8),
                                     sampling=common_pb2.SamplingParams(max_tokens=128))
    route = Route(work, session=None, cost=200)  # type: ignore[arg-type]
    times = []
    for i in range(decisions):
        work.prompt.text = f"tenant {i % 50}: summarise account {i}"
        start = time.perf_counter()
        node = dispatcher._choose("m", registry.serving("m"), route, {}, avoid_tried=False)
        times.append(time.perf_counter() - start)
        assert node is not None
    print(f"routing decision, {num_nodes} nodes: p50 {percentile(times, 0.5) * 1e6:.0f} us, "
          f"p99 {percentile(times, 0.99) * 1e6:.0f} us ({decisions} decisions)")


# ---- 2. heartbeats ------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def simulate_nodes(address: str, num_nodes: int, seconds: float, scheduler_pid: int) -> None:
    channel = grpc.aio.insecure_channel(address)
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    model = models_pb2.ModelInfo(id="m", revision="r", kind=models_pb2.MODEL_KIND_GENERATION)
    leases = []
    for i in range(num_nodes):
        reply = await stub.Register(scheduler_pb2.RegisterRequest(
            node_id=f"sim-{i}", address=f"127.0.0.1:{1}", models=[model],
            capacity=scheduler_pb2.Capacity(max_num_seqs=64, num_kv_blocks=4096, block_size=16)),
            wait_for_ready=True, timeout=60)
        leases.append(reply.lease_id)
    stop = asyncio.Event()

    async def beats(i: int):
        await asyncio.sleep(random.random())  # spread the beats over the second
        while not stop.is_set():
            yield scheduler_pb2.HeartbeatRequest(node_id=f"sim-{i}", lease_id=leases[i], load=scheduler_pb2.NodeLoad(
                running_seqs=random.randint(0, 64), free_kv_blocks=random.randint(0, 4096), steps_per_second=20.0))
            await asyncio.sleep(1.0)

    async def node(i: int) -> None:
        async for _ in stub.Heartbeat(beats(i)):
            pass

    tasks = [asyncio.create_task(node(i)) for i in range(num_nodes)]
    await asyncio.sleep(2.0)  # every stream open and beating
    cpu0, wall0 = cpu_seconds(scheduler_pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, wall1 = cpu_seconds(scheduler_pid), time.monotonic()
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    share = (cpu1 - cpu0) / (wall1 - wall0)
    print(f"heartbeats, {num_nodes} nodes at 1 Hz for {seconds:.0f} s: scheduler CPU {share * 100:.1f}% of one core")


def bench_heartbeats(num_nodes: int, seconds: float) -> None:
    port = free_port()
    env = dict(os.environ, MOEMESH_SCHEDULER_HEARTBEAT_INTERVAL="1.0", MOEMESH_SCHEDULER_MAX_MISSED_HEARTBEATS="5")
    scheduler = subprocess.Popen([sys.executable, "-m", "moemesh.services.scheduler.main", "--port", str(port)],
                                 env=env, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        asyncio.run(simulate_nodes(f"127.0.0.1:{port}", num_nodes, seconds, scheduler.pid))
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)


# ---- 3. mesh vs engine --------------------------------------------------------
def engine_in_process(model_dir: pathlib.Path, streams: int, new_tokens: int):
    """A function that runs the engine in this process once: (tokens/s at `streams` concurrent, p50 step seconds at 1)."""
    import torch
    from engine_bench import run_engine

    from moemesh.worker.engine.engine import Engine
    from moemesh.worker.engine.tokenizer import Tokenizer
    from moemesh.worker.models.checkpoint import open_checkpoint
    from moemesh.worker.models.registry import build_model

    tokenizer = Tokenizer.from_dir(model_dir)
    model = build_model(open_checkpoint(model_dir), dtype=torch.float32)
    prompts = [tokenizer.encode(f"def handler_{i}(request):\n    ") for i in range(streams)]

    def run(batch: list[list[int]]) -> tuple[float, list[float]]:
        return run_engine(Engine(model, tokenizer, max_num_seqs=max(streams, 16), max_model_len=1024), batch, new_tokens)

    run(prompts[:2])  # warm-up

    def once() -> tuple[float, float]:
        tps, _ = run(prompts)
        _, steps = run(prompts[:1])
        return tps, statistics.median(steps[1:])

    return once


def start_streams_mesh(workdir: pathlib.Path, streams: int, model_dir: pathlib.Path = DEMO_MODEL) -> RunningMesh:
    """The local mesh on `model_dir`, with room for `streams` sequences per worker."""
    return start_mesh(workdir, "--no-http", "--no-embeddings", "--model", str(model_dir),
                      "--max-num-seqs", str(max(streams, 16)), quiet=True)


async def mesh_streams(address: str, streams: int, new_tokens: int) -> tuple[float, list[float]]:
    """(tokens/s over `streams` concurrent streams, every inter-token gap seen by the client)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        gaps: list[float] = []

        async def one(i: int) -> int:
            request = generation_pb2.GenerateRequest(
                prompt=common_pb2.Prompt(text=f"def handler_{i}(request):\n    "),
                sampling=common_pb2.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                cache_mode=common_pb2.CACHE_MODE_NO_STORE)  # every stream really generates
            count, last = 0, None
            async for event in stub.Generate(request, timeout=300):
                now = time.perf_counter()
                if event.token_ids and last is not None:
                    gaps.append((now - last) / len(event.token_ids))
                if event.token_ids:
                    last = now
                count += len(event.token_ids)
            return count

        await one(0)  # warm-up
        gaps.clear()
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - start), gaps


def bench_mesh(model_dir: pathlib.Path, streams: int, new_tokens: int, repeats: int) -> None:
    """The mesh against the in-process engine, alternating `repeats` times; each side keeps its best run."""
    engine_once = engine_in_process(model_dir, streams, new_tokens)
    engine_runs, mesh_runs, steps, gap_medians = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_streams_mesh(pathlib.Path(tmp), streams, model_dir)
        address = mesh.gateway
        try:
            for _ in range(repeats):
                # While one side runs the other is idle: the mesh's processes stay up but wait.
                tps, step = engine_once()
                engine_runs.append(tps)
                steps.append(step)
                mesh_tps, _ = asyncio.run(mesh_streams(address, streams, new_tokens))
                mesh_runs.append(mesh_tps)
                _, gaps = asyncio.run(mesh_streams(address, 1, new_tokens))
                gap_medians.append(statistics.median(gaps))
        finally:
            stop_mesh(mesh)
    engine_tps, mesh_tps = max(engine_runs), max(mesh_runs)
    engine_step, gap = min(steps), min(gap_medians)
    print(f"checkpoint {model_dir}; {repeats} alternating runs per side, best kept")
    print(f"engine in-process, {streams} streams: {engine_tps:8.1f} tok/s  (runs: {_fmt(engine_runs, '.0f')})")
    print(f"full mesh,         {streams} streams: {mesh_tps:8.1f} tok/s  (runs: {_fmt(mesh_runs, '.0f')})  "
          f"ratio {mesh_tps / engine_tps:.2f} (target >= 0.9)")
    print(f"1 stream: client inter-token p50 {gap * 1e3:.2f} ms (runs: {_fmt([g * 1e3 for g in gap_medians], '.2f')}), "
          f"engine step p50 {engine_step * 1e3:.2f} ms (runs: {_fmt([t * 1e3 for t in steps], '.2f')}), "
          f"added per token {(gap - engine_step) * 1e3:.2f} ms (target <= 1 ms)")


def _fmt(values: list[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", default="", help="checkpoint for the mesh comparison ('demo': the demo model; "
                                                   "default: the ~100M bench checkpoint)")
    parser.add_argument("--skip-routing", action="store_true")
    parser.add_argument("--skip-heartbeats", action="store_true")
    parser.add_argument("--skip-mesh", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternating mesh / in-process runs; each keeps its best")
    args = parser.parse_args()
    if not args.skip_routing:
        bench_routing(args.nodes)
    if not args.skip_heartbeats:
        bench_heartbeats(args.nodes, args.heartbeat_seconds)
    if not args.skip_mesh:
        model_dir = bench_model(args.model, pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
        bench_mesh(model_dir, args.streams, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
