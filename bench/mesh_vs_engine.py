"""The mesh on its defaults, driven by an external OpenAI-SDK client, against the in-process engine fed the same
requests: what a user gets against what the engine can do.

On the ~100M-parameter benchmark Mixtral (`bench.engine_bench` builds it), in one run, alternating:

  1. the engine in-process, sized as a worker sizes itself by default (KV pool
     from the memory budget, sequence limit from the pool), fed the load as a
     closed loop: `--requests` requests, `--concurrency` in flight, each a
     100-word prompt (about 160 tokens) and 128 greedy tokens with EOS ignored;
  2. `moemesh up --model M` (no other flag), and the same load sent by another
     process with the `openai` SDK (streamed completions, as a user's client).

It prints output tokens/s of both, their ratio (target >= 0.9; >= 0.85 on a
2-core machine that also runs the client), the client's inter-token p50
against the engine's decode step p50 (target <= 1.15), and TTFT p50. Usage:

    python -m bench.mesh_vs_engine [--concurrency 32] [--requests 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.engine_bench import build_checkpoint
from bench.scheduler_bench import cpu_seconds
from moemesh.local import start_mesh, stop_mesh
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from moemesh.worker.server.config import WorkerConfig
from moemesh.worker.server.main import engine_size
from tests.support.checkpoints import CORPUS

# Words of the corpus the benchmark tokenizer was trained on: about 1.6 tokens a word.
WORDS = sorted(set(CORPUS.split()))


def word_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    """`n` prompts of `words` words each (about 1.6 tokens a word with the benchmark tokenizer)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


# ---- the engine in-process -----------------------------------------------------------------------------------
def default_engine(ckpt: pathlib.Path) -> Engine:
    """The engine as a worker started without flags builds it (the same model load and sizing)."""
    config = WorkerConfig(model_dir=ckpt, scheduler="127.0.0.1:1")
    model = build_model(open_checkpoint(ckpt), dtype=torch.float32, pack_weights=config.pack_weights)
    tokenizer = Tokenizer.from_dir(ckpt)
    size = engine_size(model, config)
    return Engine(model, tokenizer, max_num_seqs=size.max_num_seqs, max_model_len=config.max_model_len,
                  num_blocks=size.num_blocks, block_size=config.block_size,
                  max_num_batched_tokens=size.max_num_batched_tokens)


def run_engine(engine: Engine, prompts: list[list[int]], concurrency: int, new_tokens: int) -> tuple[float, float]:
    """Closed loop: (output tokens/s, p50 seconds of the steps that only decode)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    pending = list(enumerate(prompts))
    in_flight, generated, decode_steps = 0, 0, []
    start = time.perf_counter()
    while pending or engine.has_work():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add(GenerationRequest(f"r{i}-{start}", tuple(prompt), params))
            in_flight += 1
        decoding_only = all(seq.num_computed == len(seq.token_ids) - 1 for seq in engine.running) and \
            not engine.waiting
        step_start = time.perf_counter()
        outputs = engine.step()
        if decoding_only and engine.running:
            decode_steps.append(time.perf_counter() - step_start)
        generated += sum(len(o.token_ids) for o in outputs)
        in_flight -= sum(1 for o in outputs if o.finish_reason)
    return generated / (time.perf_counter() - start), statistics.median(decode_steps)


# ---- the mesh, from an external OpenAI-SDK client --------------------------------------------------------------
CLIENT = r'''
import asyncio, json, resource, sys, time
import openai

async def main(base_url, prompts, concurrency, new_tokens):
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    gaps, ttfts, tokens = [], [], 0
    queue = list(prompts)

    async def worker():
        nonlocal tokens
        while queue:
            prompt = queue.pop(0)
            start = time.perf_counter(); last = None
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                     stream_options={"include_usage": True},
                                                     extra_headers={"Cache-Control": "no-store"})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                # A chunk per event (a token, or a few when the stream coalesces them); its text may be
                # empty (ids the benchmark tokenizer does not decode).
                if last is None:
                    ttfts.append(now - start)
                else:
                    gaps.append(now - last)
                last = now

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    await client.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    gaps.sort(); ttfts.sort()
    print(json.dumps({"tokens_per_s": tokens / elapsed, "itl_p50": gaps[len(gaps) // 2],
                      "ttft_p50": ttfts[len(ttfts) // 2], "chunks": len(gaps) + len(ttfts),
                      "client_cpu_s": usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime}))

args = json.loads(sys.argv[1])
asyncio.run(main(args["base_url"], args["prompts"], args["concurrency"], args["new_tokens"]))
'''


def run_client(base_url: str, prompts: list[str], concurrency: int, new_tokens: int) -> dict:
    """The load from another process, as a user's client sends it."""
    args = json.dumps({"base_url": base_url, "prompts": prompts, "concurrency": concurrency,
                       "new_tokens": new_tokens})
    out = subprocess.run([sys.executable, "-c", CLIENT, args], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"the client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    args = parser.parse_args()
    ckpt = build_checkpoint(args.workdir)
    prompts = word_prompts(args.requests, args.words)
    engine = default_engine(ckpt)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    print(f"checkpoint {ckpt}; {args.requests} requests, {args.concurrency} concurrent, "
          f"{statistics.mean(map(len, ids)):.0f} prompt tokens (mean) + {args.new_tokens}; engine sized "
          f"{engine.max_num_seqs} sequences, {engine.blocks.num_blocks * engine.block_size} KV tokens, "
          f"{engine.max_num_batched_tokens} tokens a step; "
          f"{torch.get_num_threads()} threads")
    run_engine(engine, ids[:4], 4, 8)  # warm-up
    engine_runs, mesh_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        mesh = start_mesh(pathlib.Path(tmp), "--no-embeddings", "--model", str(ckpt), quiet=True)
        base_url = f"http://{mesh.http}/v1"
        try:
            run_client(base_url, prompts[:4], 4, 8)  # warm-up
            services = {"gateway": mesh.ready["gateway"]["pid"], "scheduler": mesh.ready["scheduler"]["pid"],
                        "worker": mesh.ready["workers"][0]["pid"]}
            for _ in range(args.repeats):  # alternating: while one side runs, the other waits
                engine_runs.append(run_engine(engine, ids, args.concurrency, args.new_tokens))
                before = {name: cpu_seconds(pid) for name, pid in services.items()}
                mesh_runs.append(run_client(base_url, prompts, args.concurrency, args.new_tokens))
                mesh_runs[-1]["cpu_s"] = {"client": mesh_runs[-1]["client_cpu_s"],
                                          **{name: cpu_seconds(pid) - before[name] for name, pid in services.items()}}
        finally:
            stop_mesh(mesh)
    engine_tps, step = max(r[0] for r in engine_runs), min(r[1] for r in engine_runs)
    best = max(mesh_runs, key=lambda r: r["tokens_per_s"])
    itl = min(r["itl_p50"] for r in mesh_runs)
    print(f"engine in-process:   {engine_tps:7.1f} tok/s  (runs: {', '.join(f'{r[0]:.0f}' for r in engine_runs)}); "
          f"decode step p50 {step * 1e3:.1f} ms")
    mesh_list = ", ".join(f"{r['tokens_per_s']:.0f}" for r in mesh_runs)
    print(f"mesh, OpenAI client: {best['tokens_per_s']:7.1f} tok/s  "
          f"(runs: {mesh_list}); inter-token p50 {itl * 1e3:.1f} ms, "
          f"TTFT p50 {best['ttft_p50'] * 1e3:.0f} ms")
    for i, run in enumerate(mesh_runs):
        seconds = run["chunks"] / run["tokens_per_s"]
        print(f"round {i + 1}: mesh {run['tokens_per_s']:.0f} tok/s against the engine's "
              f"{engine_runs[i][0]:.0f} ({run['tokens_per_s'] / engine_runs[i][0]:.2f}); CPU seconds over its "
              f"{seconds:.1f} s: " + ", ".join(f"{name} {cpu:.2f}" for name, cpu in run["cpu_s"].items()) +
              f"; the client {run['cpu_s']['client'] / run['chunks'] * 1e6:.0f} us a chunk")
    print(f"mesh / engine: {best['tokens_per_s'] / engine_tps:.2f}  (target >= 0.90; >= 0.85 on 2 cores with the "
          f"client); inter-token p50 / engine decode step: {itl / step:.2f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
