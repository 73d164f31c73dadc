"""The engine on CUDA: every CPU engine test, run again with the tiny Mixtral and its KV cache on the GPU.

In float32 the bar is the CPU's: a sequence gives the same greedy tokens
alone or in any batch, chunked, prefix-cached or preempted, and a seeded
request the same samples whatever shares its batch; decode steps replay
CUDA graphs by default, and give the eager engine's tokens. In bfloat16 (the CUDA
default) rounding depends on the batch, so the engine is held to what does
not: every request is served to its length, text is the decoding of the
tokens, and every block comes back.

On a machine without CUDA these tests report as skipped (not applicable).
"""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.cuda_graphs import graph_buckets
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.kv_sizing import GIB, POOL_CAP_FACTOR, plan_gpu_kv_pool
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.model import test_engine, test_engine_scheduling, test_structured
from tests.support.engine import random_prompt, request, run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    """The tiny Mixtral in float32 on the GPU: every engine fixture of this module builds on it."""
    return build_model(open_checkpoint(checkpoint_dir), dtype=torch.float32, device="cuda")


class TestEngineOnCuda(test_engine.TestEngine):
    """Every CPU engine test, on CUDA."""


class TestEngineSchedulingOnCuda(test_engine_scheduling.TestEngineScheduling):
    """Every CPU scheduling test, on CUDA."""


class TestStructuredOutputsOnCuda(test_structured.TestStructuredOutputs):
    """Constrained decoding on CUDA: the bitmasks unpacked on the GPU."""


class TestPromptScoringOnCuda(test_structured.TestPromptScoring):
    """Prompt logprobs on CUDA against transformers' on the CPU."""


def test_the_engine_runs_its_model_and_cache_on_the_gpu(make_engine):
    on_gpu = make_engine()
    assert on_gpu.device.type == "cuda"
    assert on_gpu.cache.k[0].is_cuda and on_gpu.cache.v[0].is_cuda
    got = run(on_gpu, [request("a", random_prompt(9, seed=1), max_tokens=4)])["a"]
    assert got["finish"] == "length" and len(got["ids"]) == 4


def test_a_bfloat16_engine_serves_a_crowded_mixed_batch_to_the_end(checkpoint_dir, tokenizer):
    model16 = build_model(open_checkpoint(checkpoint_dir), dtype=torch.bfloat16, device="cuda")
    # 6 sequences of up to 30 + 24 positions need 6 x 14 blocks of 4; 24 blocks force preemption, and a
    # 16-token budget splits the longer prompts into chunks.
    crowded = Engine(model16, tokenizer, max_num_seqs=6, max_model_len=64, block_size=4, num_blocks=24,
                     max_num_batched_tokens=16)
    assert crowded.cache.k[0].dtype == torch.bfloat16
    shared = random_prompt(12, seed=3)
    batch = [request(f"r{i}", shared + random_prompt(6 + 3 * i, seed=10 + i), max_tokens=24,
                     **({"temperature": 0.8, "seed": i} if i % 2 else {})) for i in range(6)]
    got = run(crowded, batch)
    assert crowded.counters.preemptions > 0, "the pool was meant to run out"
    for r in batch:
        result = got[r.request_id]
        assert result["finish"] == "length" and len(result["ids"]) == 24, (r.request_id, result)
        assert all(0 <= t < model16.vocab_size for t in result["ids"])
        assert result["text"] == tokenizer.decode(result["ids"])
    assert crowded.num_free_blocks == crowded.blocks.num_blocks, "blocks leaked"


def test_the_kv_pool_takes_what_the_memory_budget_leaves(model):
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    plan = plan_gpu_kv_pool(model, block_size=16, utilization=0.5, max_num_seqs=32, max_num_batched_tokens=512,
                            max_model_len=256)
    assert plan.total_bytes == total and plan.bytes_per_block == model.make_cache(1, 16).bytes_per_block
    assert 0 < plan.step_bytes < GIB, f"a 512-token step of the tiny model took {plan.step_bytes} bytes"
    assert plan.in_use_bytes >= total - free - GIB, "what was in use before the plan is counted"
    budget = (int(total * 0.5) - plan.in_use_bytes - plan.step_bytes) // plan.bytes_per_block
    cap = POOL_CAP_FACTOR * 32 * (256 // 16)  # the tiny model on a large GPU: capped
    assert plan.num_blocks == min(budget, cap) > 0 and plan.capped == (budget > cap)
    assert f"KV pool: {plan.num_blocks} blocks of 16 tokens" in plan.describe(16)
    # The pool it sizes fits: with it allocated, the device is filled to about the fraction asked for.
    cache = model.make_cache(plan.num_blocks, 16)
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    assert (total - free_after) <= 0.5 * total, "the pool overshot its budget"
    del cache
    torch.cuda.empty_cache()
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        plan_gpu_kv_pool(model, block_size=16, utilization=plan.in_use_bytes / total / 2, max_num_seqs=32,
                         max_num_batched_tokens=512, max_model_len=256)


def test_decode_steps_replay_cuda_graphs_and_give_the_eager_engines_tokens(make_engine):
    with_graphs = make_engine(max_num_seqs=8)
    assert with_graphs.graphs is not None, "a model on the Triton backends is graph-safe"
    assert sorted(with_graphs.graphs.graphs) == graph_buckets(8)
    batch = [request(f"r{i}", random_prompt(5 + 4 * i, seed=i), max_tokens=12,
                     **({"temperature": 1.0, "seed": i} if i % 2 else {})) for i in range(5)]
    replayed = run(with_graphs, batch)
    assert with_graphs.graphs.replays > 0, "decode steps must replay the graphs"
    eager_engine = make_engine(max_num_seqs=8, cuda_graphs=False)
    assert eager_engine.graphs is None
    eager = run(eager_engine, batch)
    for r in batch:
        assert replayed[r.request_id]["ids"] == eager[r.request_id]["ids"], f"{r.request_id}: graphs changed the output"
