"""A shared expert computed while the shards compute, against computed after the exchange, in one run.

Qwen2-MoE keeps its shared expert on rank 0 of an expert-parallel replica.
Rank 0 now computes it after its own routed experts and before it reads the
shards' answers (`MoEExperts.forward(..., alongside=)`), where it used to
compute it after the whole exchange. This script builds a random Qwen2-MoE
checkpoint shaped like the ~100M benchmark Mixtral (hidden 512, 8 layers, 8
experts of 1,024, top-2) with a shared expert four times an expert's width
(Qwen1.5-MoE's ratio), starts a 2-rank replica (the shard a subprocess, each
rank with the threads `moemesh up --ep-size 2` gives it) and times the
engine's median step at 1 and 32 sequences both ways, alternating rounds.

Usage:

    python -m bench.ep_shared_bench [--rounds 3] [--new-tokens 32] [--smoke]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

import torch

from bench.engine_bench import prompts
from bench.ep_bench import engine_steps, start_shards, threads_per_rank
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.layers import SparseMoeBlock
from moemesh.worker.models.qwen2_moe import Qwen2MoeSparseMoeBlock
from moemesh.worker.models.registry import build_model
from moemesh.worker.ops.remote import ExpertExchange, ExpertParallelConfig
from moemesh.worker.server.shard import parse_placement
from tests.support.checkpoints import build_tiny_qwen2_moe

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
             moe_intermediate_size=1024, shared_expert_intermediate_size=4096, num_hidden_layers=8, num_experts=8,
             num_experts_per_tok=2, mlp_only_layers=[], vocab_size=4096, max_position_embeddings=1024)
SMOKE_SHAPE = dict(SHAPE, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                   moe_intermediate_size=32, shared_expert_intermediate_size=128, num_hidden_layers=2)


def after_the_exchange(block: Qwen2MoeSparseMoeBlock, hidden: torch.Tensor) -> torch.Tensor:
    """The former order: the routed experts' whole exchange, then the shared expert."""
    return SparseMoeBlock.forward(block, hidden) + block.run_shared_expert(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one short round: checks the script")
    args = parser.parse_args()
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    rounds, new_tokens, seq_counts = (1, 4, (1, 4)) if args.smoke else (args.rounds, args.new_tokens, (1, 32))
    ckpt_dir = args.workdir / ("qwen2-moe-smoke" if args.smoke else "qwen2-moe-100m")
    if not (ckpt_dir / "config.json").exists():
        build_tiny_qwen2_moe(ckpt_dir, seed=0, **shape)
    ckpt, tokenizer = open_checkpoint(ckpt_dir), Tokenizer.from_dir(ckpt_dir)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="ep-shared-bench-"))
    shards = start_shards(ckpt_dir, 2, threads_per_rank(2), logs)
    torch.set_num_threads(threads_per_rank(2))
    steps: dict[str, dict[int, list[float]]] = {"after": {n: [] for n in seq_counts},
                                                "alongside": {n: [] for n in seq_counts}}
    alongside = Qwen2MoeSparseMoeBlock.forward
    try:
        config = ExpertParallelConfig(parse_placement(ckpt, None, 2), tuple(s.info["address"] for s in shards))
        with ExpertExchange.connect(config, ckpt.revision) as exchange:
            model = build_model(ckpt, expert_parallel=exchange)
            engine_steps(model, tokenizer, prompts(2, 16, model.vocab_size), 4)  # warm-up
            for _ in range(rounds):
                for name, forward in (("after", after_the_exchange), ("alongside", alongside)):
                    Qwen2MoeSparseMoeBlock.forward = forward
                    for seqs in seq_counts:
                        step, _ = engine_steps(model, tokenizer, prompts(seqs, 100, model.vocab_size), new_tokens)
                        steps[name][seqs].append(step)
    finally:
        Qwen2MoeSparseMoeBlock.forward = alongside
        for shard in shards:
            shard.stop()
    print(f"checkpoint {ckpt_dir} ({shape}); 2 ranks, {threads_per_rank(2)} thread(s) each; logs in {logs}")
    for seqs in seq_counts:
        after, during = steps["after"][seqs], steps["alongside"][seqs]
        print(f"{seqs:3d} seqs: step {statistics.median(during) * 1e3:7.2f} ms with the shared expert computed while "
              f"the shards compute, {statistics.median(after) * 1e3:7.2f} ms after the exchange "
              f"({statistics.median(during) / statistics.median(after):.2f}x); each round, after / while: "
              f"{', '.join(f'{a * 1e3:.1f}/{d * 1e3:.1f}' for a, d in zip(after, during))} ms")


if __name__ == "__main__":
    main()
