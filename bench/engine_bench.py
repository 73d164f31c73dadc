"""Engine throughput against `transformers` generate and the bare model step, in one run.

Builds (once, cached under --workdir) a random Mixtral-architecture
checkpoint of about 100M parameters (hidden 512, 8 layers, 8 experts, top-2,
vocab 4096), then measures, on the same weights, dtype and thread count:

  1. `transformers` generate on a padded batch (greedy, fixed new tokens);
  2. the moemesh engine with the same requests submitted concurrently;
  3. the bare batched model step: the same prefill and decode as forward calls
     alone, without the engine (scheduling, sampling, detokenization): the ceiling;

and prints tokens/s and the ratios. Usage:

    python -m bench.engine_bench [--concurrency 32] [--prompt-tokens 100] [--new-tokens 128]
                                 [--no-native] [--no-pack] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import torch

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from moemesh.worker.ops.native import load_kernels
from tests.support.checkpoints import build_tiny_mixtral

BENCH_CONFIG = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
                    max_position_embeddings=1024)


def build_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
    """The ~100M-parameter random checkpoint, built once."""
    out = workdir / "mixtral-100m"
    if not (out / "config.json").exists():
        build_tiny_mixtral(out, seed=0, **BENCH_CONFIG)
    return out


def bench_model(choice: str, workdir: pathlib.Path) -> pathlib.Path:
    """A benchmark's model: a checkpoint directory, "demo" (the bundled demo model), or "" (the ~100M one)."""
    if choice == "demo":
        from moemesh.cli import demo_model_dir

        return demo_model_dir()
    return pathlib.Path(choice) if choice else build_checkpoint(workdir)


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def load_transformers(ckpt: pathlib.Path, dtype: torch.dtype, device: str = "cpu"):
    """transformers' Mixtral on the same checkpoint, in `dtype` on `device`."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()


def bench_transformers(ckpt: pathlib.Path, batch: list[list[int]], new_tokens: int, dtype: torch.dtype) -> float:
    """Tokens/s of transformers generate on a padded batch (equal lengths: no padding waste)."""
    return run_transformers(load_transformers(ckpt, dtype), batch, new_tokens)


def run_transformers(model, batch: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of a loaded transformers model's greedy generate on the batch (after a short warm-up)."""
    ids = torch.tensor(batch, device=model.device)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        synchronize(model.device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        synchronize(model.device)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(batch) * new_tokens / elapsed


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a host clock times it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(engine: Engine, batch: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """Submit every prompt at once (greedy, `new_tokens` each) and step until done: (tokens/s, each step's seconds)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add(GenerationRequest(f"r{i}", tuple(prompt), params))
    generated, steps = 0, []
    while engine.has_work():
        step_start = time.perf_counter()
        generated += sum(len(o.token_ids) for o in engine.step())
        steps.append(time.perf_counter() - step_start)
    elapsed = time.perf_counter() - start
    assert generated == len(batch) * new_tokens
    return generated / elapsed, steps


def bench_engine(model, tokenizer, batch: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of the engine with every request submitted at once."""
    engine = Engine(model, tokenizer, max_num_seqs=max(len(batch), 1), max_model_len=len(batch[0]) + new_tokens + 8)
    return run_engine(engine, batch, new_tokens)[0]


def bench_bare_step(model, batch: list[list[int]], new_tokens: int, max_batched_tokens: int = 2048) -> float:
    """Tokens/s of the model's forward calls alone for the same work (the ceiling): prefill, then decode.

    Prompts are prefilled whole, as many per forward call as fit in the
    engine's token budget; then every sequence decodes one token per call.
    The per-call inputs (ids, positions, block tables, masks) are built
    before the clock starts: only the model's forward calls are timed.
    """
    n, length, block_size = len(batch), len(batch[0]), 16
    per_seq = -(-(length + new_tokens) // block_size)
    cache = model.make_cache(n * per_seq, block_size)
    device = cache.k[0].device
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
    windows = model.layer_windows
    per_call = max(1, max_batched_tokens // length)
    prefills = [ForwardBatch.build([SequenceChunk(p, 0, t) for p, t in zip(batch[i : i + per_call], tables[i : i + per_call])],
                                   block_size, windows, device) for i in range(0, n, per_call)]
    steps = [ForwardBatch.build([SequenceChunk([0], length + step, t) for t in tables], block_size, windows, device)
             for step in range(new_tokens - 1)]
    with torch.inference_mode():
        synchronize(device)
        start = time.perf_counter()
        ids = torch.cat([model(prefill, cache).argmax(-1) for prefill in prefills])
        for step in steps:
            step.input_ids = ids  # greedy feedback, so that routing sees real tokens
            ids = model(step, cache).argmax(-1)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return n * new_tokens / elapsed


def _fmt(runs: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels for the engine sweep")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--no-pack", action="store_true", help="keep the plain weights (no oneDNN packing on CPU)")
    parser.add_argument("--no-native", action="store_true", help="the PyTorch path only (no native CPU kernels)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per contender; each keeps its best")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.no_native:
        os.environ["MOEMESH_NATIVE_KERNELS"] = "0"  # read once, when the kernels are first asked for
    kernels = load_kernels()
    ckpt = build_checkpoint(args.workdir)
    model = build_model(open_checkpoint(ckpt), dtype=dtype, pack_weights=False)
    params = sum(p.numel() for p in model.parameters())  # counted before packing releases the plain copies
    packed = model.choose_backends() if not args.no_pack else 0
    tokenizer = Tokenizer.from_dir(ckpt)
    print(f"checkpoint {ckpt} ({params / 1e6:.1f}M parameters), {args.dtype}, {torch.get_num_threads()} threads, "
          f"{packed} modules with packed weights, native CPU kernels: {'on' if kernels.available else kernels.reason}")
    batch = prompts(args.concurrency, args.prompt_tokens, BENCH_CONFIG["vocab_size"])

    bench_engine(model, tokenizer, batch[:2], 8)  # warm-up: first-touch of the cache, kernel selection
    # Contenders alternate, `--repeats` times, and each keeps its best run: the machines are shared
    # and noisy, and the least disturbed run is the fairest figure for every side alike.
    engine_runs, bare_runs, hf_runs = [], [], []
    for _ in range(args.repeats):
        engine_runs.append(bench_engine(model, tokenizer, batch, args.new_tokens))
        bare_runs.append(bench_bare_step(model, batch, args.new_tokens))
        if not args.skip_transformers:
            hf_runs.append(bench_transformers(ckpt, batch, args.new_tokens, dtype))
    engine_tps, bare_tps = max(engine_runs), max(bare_runs)
    print(f"engine            {args.concurrency:3d} seqs: {engine_tps:8.1f} tok/s  (runs: {_fmt(engine_runs)})")
    print(f"bare model step   {args.concurrency:3d} seqs: {bare_tps:8.1f} tok/s  (the same prefill and decode as "
          f"forward calls alone; runs: {_fmt(bare_runs)})")
    print(f"engine / bare step: {engine_tps / bare_tps:.2f}")
    if hf_runs:
        hf_tps = max(hf_runs)
        print(f"transformers      {args.concurrency:3d} seqs: {hf_tps:8.1f} tok/s  (padded batch generate; "
              f"runs: {_fmt(hf_runs)})")
        print(f"engine / transformers: {engine_tps / hf_tps:.2f}  (target >= 2.5)")
    one = prompts(1, args.prompt_tokens, BENCH_CONFIG["vocab_size"])
    engine_one = max(bench_engine(model, tokenizer, one, args.new_tokens) for _ in range(args.repeats))
    bare_one = max(bench_bare_step(model, one, args.new_tokens) for _ in range(args.repeats))
    print(f"one sequence: time per output token engine {1000 / engine_one:.2f} ms, bare step {1000 / bare_one:.2f} ms,"
          f" ratio {bare_one / engine_one:.2f} (target <= 1.1)")
    for level in [int(x) for x in args.levels.split(",")]:
        tps = bench_engine(model, tokenizer, prompts(level, args.prompt_tokens, BENCH_CONFIG["vocab_size"]),
                           args.new_tokens)
        print(f"engine at {level:3d} concurrent: {tps:8.1f} tok/s")


if __name__ == "__main__":
    main()
