"""Expert-parallel replicas against the single-process engine, in one run.

On the ~100M benchmark checkpoint (`bench.engine_bench.build_checkpoint`) it
measures, for replicas of 2 and 4 ranks (shards as real subprocesses on
this machine, contiguous placement):

  1. the engine's median step time at 1 and 32 sequences, against the
     single-process engine on the same requests, the two run in alternating
     rounds (`--rounds`), so that a host whose speed drifts slows both; and
     how many threads of the ranks (or of the single process) were, on
     average, ready to run but without a core (Linux's schedstat): where the
     ranks outnumber the cores, this is what they lose to sharing them;
  2. the time of one layer exchange (rank 0 sending every shard its rows,
     computing its own experts, combining the answers) beyond the compute in
     it, against a bare gRPC bidirectional ping-pong of the same request and
     answer sizes to as many separate processes at once as the exchange
     messaged shards (the exchanges grouped by that number, each group
     against its own round trip, the groups weighted by their exchanges),
     over the same synchronous client API (target: <= 1.5x),
     idle, again while another process computes on one rank's threads
     (as a rank computes its experts while the messages travel: how much of
     the excess is the cores' contention, not the exchange's code), and at the
     layers' pace, the client computing before each round as long as rank 0
     computes between two exchanges (gRPC's threads sleep between rounds, as
     they do between layers, and pay for waking up);
  3. the bytes per step on the wire against the minimum: every routed row's
     hidden state both ways (rows x hidden x dtype size x 2) plus 4 bytes of
     id and 4 of weight per choice;
  4. the resident memory of each rank (a fresh process each) against a
     process holding the single-process model, and a bare process.

Every rank gets the torch threads `moemesh up --ep-size N` gives it: the
machine's cores divided by the ranks (at least one); the single-process
engine gets them all, as `moemesh up` gives a one-process replica.

Usage:

    python -m bench.ep_bench [--ranks 2,4] [--seqs 1,32] [--prompt-tokens 100] [--new-tokens 64] [--rounds 2]
                             [--threads-per-rank T] [--model DIR] [--smoke]

`--smoke` runs a tiny model, briefly, to check that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import grpc
import torch

from bench.engine_bench import BENCH_CONFIG, build_checkpoint, prompts, run_engine
from moemesh.v1 import experts_pb2, experts_pb2_grpc
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from moemesh.worker.ops.remote import ExchangeStats, ExpertExchange, ExpertParallelConfig
from moemesh.worker.server.shard import parse_placement, resident_bytes
from tests.support.checkpoints import build_tiny_mixtral

PING_METHOD = "/bench.PingPong/Exchange"
MIB = 1024 * 1024


# ---- processes ----------------------------------------------------------------------------------------------------

class Child:
    """A process started with a ready pipe: its first line is JSON describing it."""

    def __init__(self, argv: list[str], log: pathlib.Path) -> None:
        read_fd, write_fd = os.pipe()
        with open(log, "ab") as out:
            self.process = subprocess.Popen([*argv, "--ready-fd", str(write_fd)], pass_fds=(write_fd,), stdout=out,
                                            stderr=out)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            line = pipe.readline()
        if not line:
            raise RuntimeError(f"{argv[:4]} exited before it was ready:\n{log.read_text()[-2000:]}")
        self.info = json.loads(line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def threads_per_rank(world_size: int) -> int:
    """What `moemesh up --ep-size N` gives each rank on this machine: the cores divided by the ranks."""
    return max(1, (os.cpu_count() or 1) // world_size)


def start_shards(ckpt_dir: pathlib.Path, world_size: int, threads: int, logs: pathlib.Path) -> list[Child]:
    return [Child([sys.executable, "-m", "moemesh.worker.server.shard", "--model-dir", str(ckpt_dir), "--rank",
                   str(rank), "--world-size", str(world_size), "--num-threads", str(threads)],
                  logs / f"shard-{world_size}-{rank}.log") for rank in range(1, world_size)]


def measure_in_child(mode: str, ckpt_dir: pathlib.Path, logs: pathlib.Path, shards: list[str] = ()) -> int:
    """Resident bytes of a fresh process that loads `mode` ("bare", "single" or "rank0") and stays."""
    child = Child([sys.executable, "-m", "bench.ep_bench", "--child", mode, "--model", str(ckpt_dir),
                   "--shards", ",".join(shards)], logs / f"rss-{mode}.log")
    child.stop()
    return child.info["resident_bytes"]


def child_main(args: argparse.Namespace) -> None:
    """--child: load what `args.child` names, report resident bytes on the ready pipe, wait for SIGTERM."""
    if args.child == "pingpong":
        serve_pingpong(args.ready_fd)
        return
    if args.child == "burn":
        burn(args.ready_fd, args.threads_per_rank)
        return
    if args.child != "bare":
        ckpt = open_checkpoint(args.model)
        if args.child == "single":
            model = build_model(ckpt)
        else:
            shards = tuple(args.shards.split(","))
            placement = parse_placement(ckpt, None, len(shards) + 1)
            exchange = ExpertExchange.connect(ExpertParallelConfig(placement, shards), ckpt.revision)
            model = build_model(ckpt, expert_parallel=exchange)
        assert model is not None
    with os.fdopen(args.ready_fd, "w") as pipe:
        pipe.write(json.dumps({"resident_bytes": resident_bytes()}) + "\n")
    time.sleep(3600)


# ---- the bare ping-pong -------------------------------------------------------------------------------------------

# Between two messages the ranks read their experts' weights (tens of MiB a layer): the caches the gRPC path
# runs in come back cold. A ping-pong whose ends read this much memory between messages pays for that too.
WORKING_SET_BYTES = 32 * MIB


def read_memory(seconds: float, buffer: torch.Tensor) -> None:
    """Stream through `buffer`, a MiB at a time, for `seconds`: memory-bound work like the experts'."""
    until = time.perf_counter() + seconds
    chunks = buffer.split(MIB // buffer.element_size())
    while time.perf_counter() < until:
        for chunk in chunks:
            chunk.sum()
            if time.perf_counter() >= until:
                return


def serve_pingpong(ready_fd: int) -> None:
    """A bidirectional stream answering each request (its first 8 bytes: the answer's size; the next 8: the
    microseconds to read memory for first, as a shard computes) with that many bytes, the first 8 of them the
    nanoseconds it took before answering."""
    from concurrent import futures

    buffer = torch.ones(WORKING_SET_BYTES // 4)

    def exchange(requests, context):
        for request in requests:
            think = int.from_bytes(request[8:16], "little") * 1e-6
            started = time.perf_counter()
            if think:
                read_memory(think, buffer)
            answer = bytearray(int.from_bytes(request[:8], "little"))
            # The time it read memory, in nanoseconds, leads the answer: the client leaves it out of the trip.
            answer[:8] = round((time.perf_counter() - started) * 1e9).to_bytes(8, "little")
            yield bytes(answer)

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 256 * MIB),
                                                                 ("grpc.max_send_message_length", 256 * MIB)])
    handler = grpc.stream_stream_rpc_method_handler(exchange)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.PingPong", {"Exchange": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with os.fdopen(ready_fd, "w") as pipe:
        pipe.write(json.dumps({"address": f"127.0.0.1:{port}"}) + "\n")
    server.wait_for_termination()


def pingpong_seconds(addresses: Sequence[str], request_bytes: int, answer_bytes: int, rounds: int,
                     pace: float = 0.0, think: float = 0.0) -> float:
    """Median round trip of one request and its answer to each of `addresses` at once (as rank 0 sends each
    shard its message, then reads the answers), with the client API the exchange uses; with `pace`, the client
    computes that many seconds (matrix products on its torch threads) before each round, as rank 0 computes a
    layer's other work between two exchanges. With `think`, both ends work as the ranks do: each peer reads
    memory that long before answering (as a shard computes its experts) and the client reads memory for `pace`
    before each round; the round trip is then counted without the time the peers took before answering."""
    links = []
    for address in addresses:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 * MIB)])
        links.append((requests, channel, channel.stream_stream(PING_METHOD)(iter(requests.get, None))))
    payload = (answer_bytes.to_bytes(8, "little") + round(think * 1e6).to_bytes(8, "little")
               + bytes(max(request_bytes - 16, 0)))
    a, b = torch.randn(128, 128), torch.randn(128, 128)
    buffer = torch.ones(WORKING_SET_BYTES // 4) if think else None
    times = []
    for _ in range(rounds):
        if buffer is not None:
            read_memory(pace, buffer)
        else:
            until = time.perf_counter() + pace
            while time.perf_counter() < until:
                torch.mm(a, b)
        start = time.perf_counter()
        for requests, _, _ in links:
            requests.put(payload)
        worked = 0.0
        for _, _, call in links:
            worked = max(worked, int.from_bytes(next(call)[:8], "little") * 1e-9)
        times.append(time.perf_counter() - start - worked)
    for requests, channel, call in links:
        requests.put(None)
        call.cancel()
        channel.close()
    return statistics.median(times[rounds // 10:])


def burn(ready_fd: int, threads: int) -> None:
    """Matrix products on `threads` torch threads until terminated: the compute of one rank, without its exchange."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    with os.fdopen(ready_fd, "w") as pipe:
        pipe.write(json.dumps({"threads": threads}) + "\n")
    while True:
        torch.mm(a, b)


def busy_pingpong_seconds(addresses: Sequence[str], request_bytes: int, answer_bytes: int, rounds: int, threads: int,
                          logs: pathlib.Path) -> float:
    """`pingpong_seconds` while another process computes on `threads` threads."""
    burner = Child([sys.executable, "-m", "bench.ep_bench", "--child", "burn", "--threads-per-rank", str(threads)],
                   logs / "burn.log")
    try:
        time.sleep(0.2)  # its threads are running
        return pingpong_seconds(addresses, request_bytes, answer_bytes, rounds)
    finally:
        burner.stop()


# ---- measurements -------------------------------------------------------------------------------------------------

def engine_steps(model, tokenizer, batch: list[list[int]], new_tokens: int,
                 pids: Sequence[int] = ()) -> tuple[float, float, float]:
    """(median step seconds, tokens/s, threads waiting for a core) of the engine running `batch` to the end; the
    last is the mean number of this process's and `pids`' threads that were ready to run but had no core."""
    engine = Engine(model, tokenizer, max_num_seqs=len(batch), max_model_len=len(batch[0]) + new_tokens + 8)
    processes = [os.getpid(), *pids]
    waited, started = runqueue_seconds(processes), time.perf_counter()
    tokens_per_second, steps = run_engine(engine, batch, new_tokens)
    waiting = (runqueue_seconds(processes) - waited) / (time.perf_counter() - started)
    return statistics.median(steps), tokens_per_second, waiting


def runqueue_seconds(pids: Sequence[int]) -> float:
    """Seconds the threads of `pids` have spent ready to run but waiting for a core (Linux schedstat; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(pathlib.Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                pass  # a thread that ended meanwhile
    return total * 1e-9


def reference_round_trips(stats: ExchangeStats, pings: Sequence[str], rounds: int, pace: float, threads: int,
                          logs: pathlib.Path) -> dict:
    """The exchanges' excess against bare round trips of their messages, by the number of shards an exchange
    messaged: each group against a round trip to as many peers at once; and over all, the groups weighted by
    their exchanges. Four round trips: idle; while another process computes on one rank's threads; at the
    layers' pace (the client computing `pace` before each round); with both ends working as the ranks do (each
    peer reading memory for that group's median shard compute before answering, left out of the trip)."""
    request_size = stats.bytes_sent // stats.messages
    answer_size = stats.bytes_received // stats.messages
    groups: dict[int, list[int]] = {}
    for index, peers in enumerate(stats.peers):
        groups.setdefault(peers, []).append(index)
    by_peers, weighted, weighted_overhead = {}, {}, 0.0
    for peers, indices in sorted(groups.items()):
        share = len(indices) / len(stats.peers)
        addresses = pings[:peers]
        think = statistics.median(stats.shard_seconds[i] for i in indices)
        group = {
            "share": share, "overhead": statistics.median(stats.overheads[i] for i in indices),
            "pingpong": pingpong_seconds(addresses, request_size, answer_size, rounds),
            "busy_pingpong": busy_pingpong_seconds(addresses, request_size, answer_size, rounds, threads, logs),
            "paced_pingpong": pingpong_seconds(addresses, request_size, answer_size, rounds, pace),
            "working_pingpong": pingpong_seconds(addresses, request_size, answer_size, rounds, pace, think)}
        by_peers[peers] = {name: value * 1e3 if name != "share" else value for name, value in group.items()}
        weighted_overhead += share * group["overhead"]
        for kind in ("pingpong", "busy_pingpong", "paced_pingpong", "working_pingpong"):
            weighted[kind] = weighted.get(kind, 0.0) + share * group[kind]
    return {"by_peers": by_peers, "weighted": weighted, "weighted_overhead": weighted_overhead}


def minimum_bytes(stats: ExchangeStats, hidden_size: int, itemsize: int) -> int:
    """Each routed row's hidden state both ways, plus a 4-byte id and a 4-byte weight per choice."""
    return stats.rows_sent * hidden_size * itemsize * 2 + stats.choices_sent * 8


def bench_replica(args, ckpt_dir, tokenizer, world_size: int, single_model, logs: pathlib.Path,
                  pings: Sequence[str]) -> dict:
    """Every figure of one replica size; the single-process model runs the same batches in alternating rounds."""
    ckpt = open_checkpoint(ckpt_dir)
    threads = args.threads_per_rank or threads_per_rank(world_size)
    shards = start_shards(ckpt_dir, world_size, threads, logs)
    all_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        addresses = tuple(s.info["address"] for s in shards)
        placement = parse_placement(ckpt, None, world_size)
        with ExpertExchange.connect(ExpertParallelConfig(placement, addresses), ckpt.revision) as exchange:
            model = build_model(ckpt, expert_parallel=exchange)
            hidden, itemsize = model.args.hidden_size, model.embed_tokens.weight.element_size()
            engine_steps(model, tokenizer, prompts(2, 16, model.vocab_size), 4)  # warm-up
            result = {"world_size": world_size, "threads_per_rank": threads, "by_seqs": {}}
            for seqs in args.seqs:
                batch = prompts(seqs, args.prompt_tokens, model.vocab_size)
                exchange.stats = ExchangeStats()
                rounds: dict[str, list[tuple[float, float, float]]] = {"single": [], "replica": []}
                for _ in range(args.rounds):
                    torch.set_num_threads(all_threads)
                    rounds["single"].append(engine_steps(single_model, tokenizer, batch, args.new_tokens))
                    torch.set_num_threads(threads)
                    rounds["replica"].append(engine_steps(model, tokenizer, batch, args.new_tokens,
                                                          [shard.process.pid for shard in shards]))
                step, tps = (statistics.median(r[i] for r in rounds["replica"]) for i in (0, 1))
                single_step, single_tps = (statistics.median(r[i] for r in rounds["single"]) for i in (0, 1))
                stats = exchange.stats
                per_exchange = statistics.median(stats.durations)
                overhead = statistics.median(stats.overheads)
                # What rank 0 computes between two exchanges: a step's time beyond its exchanges, per MoE layer.
                layers = stats.exchanges / stats.steps
                pace = max(step - layers * per_exchange, 0.0) / layers
                references = reference_round_trips(stats, pings, args.ping_rounds, pace, threads, logs)
                result["by_seqs"][seqs] = {
                    "step_ms": step * 1e3, "single_step_ms": single_step * 1e3, "tokens_per_s": tps,
                    "single_tokens_per_s": single_tps,
                    "rounds_ms": [(a[0] * 1e3, b[0] * 1e3) for a, b in zip(rounds["single"], rounds["replica"])],
                    "waiting_threads": statistics.median(r[2] for r in rounds["replica"]),
                    "single_waiting_threads": statistics.median(r[2] for r in rounds["single"]),
                    "exchange_ms": per_exchange * 1e3, "overhead_ms": overhead * 1e3, "pace_ms": pace * 1e3,
                    "by_peers": references["by_peers"],
                    **{f"{kind}_ms": seconds * 1e3 for kind, seconds in references["weighted"].items()},
                    "weighted_overhead_ms": references["weighted_overhead"] * 1e3,
                    "shard_compute_ms_per_message": stats.shard_compute_seconds / stats.messages * 1e3,
                    "bytes_per_step": (stats.bytes_sent + stats.bytes_received) / stats.steps,
                    "minimum_bytes_per_step": minimum_bytes(stats, hidden, itemsize) / stats.steps,
                    "messages_per_step": stats.messages / stats.steps}
            result["rank0_rss"] = measure_in_child("rank0", ckpt_dir, logs, addresses)
        result["shard_rss"] = [describe(s.info["address"]).resident_bytes for s in shards]
        return result
    finally:
        torch.set_num_threads(all_threads)
        for shard in shards:
            shard.stop()


def describe(address: str) -> experts_pb2.ShardInfo:
    with grpc.insecure_channel(address) as channel:
        return experts_pb2_grpc.ExpertShardStub(channel).Describe(experts_pb2.DescribeShardRequest(), timeout=30)


def report(replicas: list[dict], rss: dict) -> None:
    for replica in replicas:
        n = replica["world_size"]
        for seqs, f in replica["by_seqs"].items():
            rounds = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in f["rounds_ms"])
            print(f"{n} ranks, {seqs:3d} seqs: step {f['step_ms']:7.2f} ms against {f['single_step_ms']:.2f} ms single "
                  f"({f['step_ms'] / f['single_step_ms']:.2f}x; each round, single / replica: {rounds} ms), "
                  f"{f['tokens_per_s']:8.1f} tok/s; threads waiting for a core {f['waiting_threads']:.2f} on average "
                  f"(single process {f['single_waiting_threads']:.2f})")
            over = f["weighted_overhead_ms"]
            print(f"    exchange {f['exchange_ms']:.3f} ms, of which beyond the compute in it {f['overhead_ms']:.3f} ms "
                  f"(median; by shards messaged, weighted: {over:.3f} ms) against round trips to as many peers: "
                  f"idle {f['pingpong_ms']:.3f} ms ({over / f['pingpong_ms']:.2f}x), while one rank's threads "
                  f"compute {f['busy_pingpong_ms']:.3f} ms ({over / f['busy_pingpong_ms']:.2f}x), at the layers' "
                  f"pace (the client computing {f['pace_ms']:.2f} ms before each round) {f['paced_pingpong_ms']:.3f} "
                  f"ms ({over / f['paced_pingpong_ms']:.2f}x, target <= 1.5), with both ends working as the ranks "
                  f"do {f['working_pingpong_ms']:.3f} ms ({over / f['working_pingpong_ms']:.2f}x); shard work "
                  f"{f['shard_compute_ms_per_message']:.3f} ms/message; "
                  f"{f['bytes_per_step'] / 1024:.1f} KiB/step vs minimum {f['minimum_bytes_per_step'] / 1024:.1f} KiB "
                  f"({f['bytes_per_step'] / max(f['minimum_bytes_per_step'], 1):.2f}x)")
            for peers, g in f["by_peers"].items():
                print(f"    {g['share']:4.0%} of exchanges messaged {peers} shard(s): beyond the compute "
                      f"{g['overhead']:.3f} ms; round trip idle {g['pingpong']:.3f} ({g['overhead'] / g['pingpong']:.2f}x), "
                      f"busy {g['busy_pingpong']:.3f} ({g['overhead'] / g['busy_pingpong']:.2f}x), paced "
                      f"{g['paced_pingpong']:.3f} ({g['overhead'] / g['paced_pingpong']:.2f}x), working "
                      f"{g['working_pingpong']:.3f} ms ({g['overhead'] / g['working_pingpong']:.2f}x)")
        shard_mib = ", ".join(f"{r / MIB:.0f}" for r in replica["shard_rss"])
        print(f"{n} ranks resident: rank 0 {replica['rank0_rss'] / MIB:.0f} MiB, shards {shard_mib} MiB; single "
              f"process {rss['single'] / MIB:.0f} MiB; bare process {rss['bare'] / MIB:.0f} MiB")


def smoke_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    out = workdir / "ep-smoke"
    if not (out / "config.json").exists():
        build_tiny_mixtral(out, seed=0, num_local_experts=4, num_hidden_layers=2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="2,4", help="replica sizes")
    parser.add_argument("--seqs", default="1,32", help="concurrent sequences")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the single process and a replica")
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="torch threads of every rank of a replica; 0: as `moemesh up` sets them, the cores "
                             "divided by the ranks")
    parser.add_argument("--ping-rounds", type=int, default=200)
    parser.add_argument("--model", type=pathlib.Path, help="checkpoint; default the ~100M benchmark one")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 ranks, briefly: checks the script")
    parser.add_argument("--out", type=pathlib.Path, help="also write the figures here as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.ranks, args.seqs, args.prompt_tokens, args.new_tokens, args.ping_rounds, args.rounds = "2", "1,4", 12, 6, 30, 1
    ranks = [int(r) for r in args.ranks.split(",")]
    args.seqs = [int(s) for s in args.seqs.split(",")]
    ckpt_dir = args.model or (smoke_checkpoint(args.workdir) if args.smoke else build_checkpoint(args.workdir))
    logs = pathlib.Path(tempfile.mkdtemp(prefix="ep-bench-"))
    tokenizer = Tokenizer.from_dir(ckpt_dir)
    model = build_model(open_checkpoint(ckpt_dir))
    print(f"checkpoint {ckpt_dir}; {torch.get_num_threads()} threads for the single process, "
          f"{args.threads_per_rank or 'the cores / the ranks'} per rank of a replica; "
          f"logs in {logs}" + ("" if args.model or args.smoke else f"; config {BENCH_CONFIG}"))
    engine_steps(model, tokenizer, prompts(2, 16, model.vocab_size), 4)  # warm-up
    rss = {"bare": measure_in_child("bare", ckpt_dir, logs), "single": measure_in_child("single", ckpt_dir, logs)}
    pings = [Child([sys.executable, "-m", "bench.ep_bench", "--child", "pingpong"], logs / f"pingpong-{i}.log")
             for i in range(1, max(ranks))]  # a peer per shard of the largest replica
    try:
        addresses = [ping.info["address"] for ping in pings]
        replicas = [bench_replica(args, ckpt_dir, tokenizer, n, model, logs, addresses) for n in ranks]
    finally:
        for ping in pings:
            ping.stop()
    report(replicas, rss)
    if args.out:
        args.out.write_text(json.dumps({"replicas": replicas, "resident": rss}, indent=2))


if __name__ == "__main__":
    main()
