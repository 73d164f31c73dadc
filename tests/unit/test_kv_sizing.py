"""The KV pool's share of memory and the sequence limit it supports: the arithmetic (here) and the measured GPU plan
(tests/model/test_cuda_engine.py)."""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.kv_sizing import (
    DEFAULT_CPU_KV_GIB,
    DEFAULT_TOKEN_BUDGET,
    GIB,
    MAX_AUTO_SEQS,
    TOKENS_PER_AUTO_SLOT,
    KVPoolPlan,
    auto_max_num_seqs,
    blocks_in_budget,
    cpu_kv_budget_bytes,
    default_token_budget,
    plan_cpu_kv_pool,
)
from moemesh.worker.server.config import WorkerConfig
from moemesh.worker.server.main import engine_size
from tests.support.mesh import DEMO_MODEL


class FakeCache:
    bytes_per_block = 64 << 10  # 64 KiB: 16 tokens of 4 KiB


class FakeModel:
    max_context_tokens = 4096

    def make_cache(self, num_blocks: int, block_size: int) -> FakeCache:
        return FakeCache()


def cpu_plan(budget_gib: float, max_num_seqs: int = MAX_AUTO_SEQS, max_model_len: int = 2048) -> int:
    return plan_cpu_kv_pool(FakeModel(), block_size=16, budget_bytes=int(budget_gib * GIB), max_num_seqs=max_num_seqs,
                            max_model_len=max_model_len)


def test_the_cpu_pool_grows_with_its_budget_and_the_sequence_limit_follows():
    small, large = cpu_plan(0.125), cpu_plan(0.5)
    assert (small, large) == (2048, 8192)  # 128 MiB and 512 MiB of 64 KiB blocks
    seqs = [auto_max_num_seqs(blocks, 16, 2048) for blocks in (small, large)]
    assert seqs == [2048 * 16 // TOKENS_PER_AUTO_SLOT, 8192 * 16 // TOKENS_PER_AUTO_SLOT] == [32, 128]


def test_the_sizes_have_floors_and_ceilings():
    assert cpu_plan(64.0) == MAX_AUTO_SEQS * 2048 // 16, "past every slot at full length, blocks are not added"
    assert cpu_plan(64.0, max_num_seqs=4) == 4 * 128
    assert cpu_plan(0.0001) == 128, "at least one full-length sequence"
    assert auto_max_num_seqs(10**9, 16, 2048) == MAX_AUTO_SEQS
    assert auto_max_num_seqs(1, 16, 2048) == 1
    assert auto_max_num_seqs(64, 16, 256) == 4, "a short context gives a slot per max_model_len tokens"


def test_the_default_cpu_budget_is_documented_and_bounded():
    assert cpu_kv_budget_bytes(1.5) == int(1.5 * GIB)
    assert 0 < cpu_kv_budget_bytes() <= DEFAULT_CPU_KV_GIB * GIB


def test_the_pool_gets_the_budget_less_what_is_in_use_and_a_steps_peak():
    # 0.9 of 80 GiB = 72 GiB; less 20 GiB of weights and context and 2 GiB for a step: 50 GiB of 1 MiB blocks.
    assert blocks_in_budget(80 * GIB, 0.9, 20 * GIB, 2 * GIB, 1 << 20) == 50 * 1024
    assert blocks_in_budget(80 * GIB, 0.9, 20 * GIB, 2 * GIB, 3 << 20) == (50 * 1024) // 3, "whole blocks only"


@pytest.mark.parametrize(("in_use", "step"), [(70 * GIB, 2 * GIB), (75 * GIB, 0), (72 * GIB - 1, 0)])
def test_a_budget_without_room_for_one_block_names_the_setting(in_use, step):
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.90 of 80.0 GiB leaves no room"):
        blocks_in_budget(80 * GIB, 0.9, in_use, step, 1 << 20)


def test_the_start_up_line_says_where_the_memory_went():
    plan = KVPoolPlan(num_blocks=1000, bytes_per_block=1 << 20, total_bytes=80 * GIB, utilization=0.9,
                      in_use_bytes=20 * GIB, step_bytes=GIB // 2)
    line = plan.describe(block_size=16)
    assert "1000 blocks of 16 tokens (16000 tokens, 0.98 GiB)" in line
    assert "0.90 of 80.0 GiB" in line and "20.00 GiB in use" in line and "0.50 GiB for a step" in line


def test_the_token_budget_follows_the_cpus_threads_within_bounds_and_is_fixed_on_cuda():
    assert [default_token_budget("cpu", n) for n in (1, 2, 3, 4, 8, 64)] == [512, 512, 768, 1024, 2048, 2048]
    assert default_token_budget("cuda", 2) == default_token_budget("cuda:1", 64) == DEFAULT_TOKEN_BUDGET == 2048


def _size(**settings) -> tuple[int, int, int]:
    config = WorkerConfig(model_dir=DEMO_MODEL, scheduler="127.0.0.1:1", cpu_kv_cache_gib=0.5, **settings)
    return tuple(engine_size(FakeModel(), config))


def test_the_engine_size_takes_the_budget_as_configured_else_from_the_threads_and_never_below_the_batch():
    threads = torch.get_num_threads()
    blocks, seqs, budget = _size()
    assert budget == default_token_budget("cpu", threads) and seqs <= budget
    assert _size(max_num_batched_tokens=300)[2] == 300, "a configured budget is kept as it is"
    assert _size(max_num_seqs=4000)[1:] == (4000, 4000), "a sequence limit above the default raises the budget"
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        WorkerConfig(model_dir=DEMO_MODEL, scheduler="127.0.0.1:1", max_num_seqs=64, max_num_batched_tokens=32)
