"""The KV pool's share of GPU memory: the arithmetic (here) and the measured plan (tests/model/test_cuda_engine.py)."""

from __future__ import annotations

import pytest

from moemesh.worker.engine.kv_sizing import GIB, KVPoolPlan, blocks_in_budget


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
