"""An expert-parallel replica whose rank 0 runs on CUDA and whose shard runs on the CPU (the placement for experts
that live in host memory) computes what the single-process model on CUDA computes.

On a machine without CUDA these tests report as skipped (not applicable); `bench/gpu_check.sh` runs them.
"""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from moemesh.worker.ops.remote import ExpertExchange, ExpertParallelConfig
from moemesh.worker.server.shard import parse_placement
from tests.model.test_expert_parallel import GREEDY_TOKENS, ThreadShard, mixed_batch_logits
from tests.support.checkpoints import FAMILIES
from tests.support.engine import random_prompt, request, run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def family_dir(request, tmp_path_factory):
    return FAMILIES[request.param].build(tmp_path_factory.mktemp(f"cuda-ep-{request.param}"), seed=0)


def greedy_on(model, tokenizer) -> dict[str, list[int]]:
    engine = Engine(model, tokenizer, max_num_seqs=4, max_model_len=128)
    requests = [request(f"r{i}", random_prompt(length, seed=10 + i), max_tokens=GREEDY_TOKENS)
                for i, length in enumerate((11, 29))]
    return {rid: result["ids"] for rid, result in run(engine, requests).items()}


def test_rank_0_on_cuda_with_a_cpu_shard_matches_the_single_process_model_on_cuda(family_dir):
    ckpt = open_checkpoint(family_dir)
    tokenizer = Tokenizer.from_dir(family_dir)
    reference = build_model(ckpt, device="cuda")
    expected_logits, expected_tokens = mixed_batch_logits(reference), greedy_on(reference, tokenizer)
    del reference
    placement = parse_placement(ckpt, "contiguous", 2)
    shard = ThreadShard(ckpt, placement, 1)  # its experts on the CPU, in float32
    exchange = ExpertExchange.connect(ExpertParallelConfig(placement, (shard.address,), exchange_timeout=60,
                                                           connect_timeout=60), ckpt.revision)
    try:
        model = build_model(ckpt, device="cuda", expert_parallel=exchange)
        assert next(model.parameters()).device.type == "cuda"
        logits = mixed_batch_logits(model)
        assert logits.device.type == "cuda"
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
        assert greedy_on(model, tokenizer) == expected_tokens
        assert exchange.stats.messages > 0, "the CPU shard computed its experts"
    finally:
        exchange.close()
        shard.stop()
