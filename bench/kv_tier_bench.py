"""The shared prefix-KV tier: time to first token from Redis vs computing, and its cost at a 0% hit rate.

On the ~100M-parameter random Mixtral of bench/engine_bench.py, fp32, with
a real redis-server (the bundled one):

  1. a 1,000-token prompt prefix: one engine serves it twice (the second
     time is a local prefix hit, which writes its blocks to Redis); then, for each of a few rounds, a fresh engine with a
     cold local cache serves a prompt sharing that prefix, with and without
     the tier: time to first token, p50, and the ratio (target <= 0.3);
  2. throughput of 32 concurrent distinct prompts (nothing to share) with the
     tier on vs off: the tier's overhead (target <= 2% loss).

Usage:

    python -m bench.kv_tier_bench [--prefix-tokens 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import tempfile
import time

import redis
import torch

from bench.engine_bench import BENCH_CONFIG, build_checkpoint, prompts, run_engine
from moemesh.cache.embedded import free_port, redis_server_argv
from moemesh.cache.kv_tier import BlockSpec, RedisKVTier
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model


def start_redis() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(redis_server_argv(port, maxmemory_mb=1024), stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def time_to_first_token(engine: Engine, prompt: list[int], rid: str) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.add(GenerationRequest(rid, tuple(prompt), params))
    while engine.has_work():
        if any(o.token_ids for o in engine.step()):
            return time.perf_counter() - start
    raise RuntimeError("no token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    ckpt = build_checkpoint(args.workdir)
    model = build_model(open_checkpoint(ckpt), dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(ckpt)
    vocab = BENCH_CONFIG["vocab_size"]
    process, url = start_redis()
    try:
        def tier() -> RedisKVTier:
            shape = model.make_cache(1, 16).block_shape
            return RedisKVTier(url, "bench", "r1", BlockSpec("float32", shape))

        def engine(with_tier: bool, max_num_seqs: int = 4) -> Engine:
            return Engine(model, tokenizer, max_num_seqs=max_num_seqs, max_model_len=1024,
                          kv_tier=tier() if with_tier else None)

        prefix = prompts(1, args.prefix_tokens, vocab)[0]
        writer = engine(True)
        # A shared prefix is one that recurs: the writer sees it twice, and its second (local) hit writes it.
        time_to_first_token(writer, prefix + [7], "first")
        time_to_first_token(writer, prefix + [8], "again")
        writer.kv_tier.flush(30)
        computed, fetched = [], []
        for r in range(args.rounds):
            question = prefix + prompts(1, 16, vocab)[0][: 8 + r]
            computed.append(time_to_first_token(engine(False), question, f"c{r}"))
            cold = engine(True)
            fetched.append(time_to_first_token(cold, question, f"f{r}"))
            assert cold.counters.tier_hit_tokens >= args.prefix_tokens - 16, "the prefix must come from Redis"
        c, f = statistics.median(computed), statistics.median(fetched)
        print(f"{args.prefix_tokens}-token shared prefix, time to first token p50: computed {c * 1000:.1f} ms, "
              f"from the Redis tier {f * 1000:.1f} ms, ratio {f / c:.3f} (target <= 0.3)")

        batch = prompts(32, 100, vocab)
        on, off = [], []
        for r in range(2):  # alternate, so drift hits both sides alike
            redis.Redis.from_url(url).flushall()
            on.append(run_engine(engine(True, 32), [[3 + r] + p for p in batch], 64)[0])
            off.append(run_engine(engine(False, 32), [[3 + r] + p for p in batch], 64)[0])
        print(f"0% hit rate, 32 distinct prompts: tier on {max(on):.1f} tok/s, off {max(off):.1f} tok/s, "
              f"loss {(1 - max(on) / max(off)) * 100:.1f}% (target <= 2%)")
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
