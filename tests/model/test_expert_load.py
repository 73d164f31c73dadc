"""Expert load counted where the model runs: every router choice of every MoE layer, once, for each family."""

from __future__ import annotations

import torch

from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.expert_load import count_expert_load
from moemesh.worker.models.layers import TopKRouter
from moemesh.worker.models.registry import build_model
from tests.support.engine import random_prompt, request, run


def record_routers(model) -> tuple[list[torch.Tensor], list[TopKRouter]]:
    """Hooks recording every router's top-k ids (what the count must equal); the routers (one per MoE layer)."""
    seen: list[torch.Tensor] = []
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.register_forward_hook(lambda module, args, out: seen.append(out[0].reshape(-1).clone()))
    return seen, routers


def test_each_token_counts_once_per_moe_layer_for_each_of_its_top_k_experts(ckpt_dir, one_thread):
    model = build_model(open_checkpoint(ckpt_dir))
    load = count_expert_load(model)
    seen, routers = record_routers(model)
    engine = Engine(model, Tokenizer.from_dir(ckpt_dir), max_num_seqs=4, max_model_len=256)
    assert load.take() == [0] * load.num_experts, "nothing counted before the first step"
    prompts = [random_prompt(n, seed=n) for n in (5, 17, 33)]
    results = run(engine, [request(f"r{i}", p, max_tokens=6) for i, p in enumerate(prompts)])

    counted = load.take()
    forwarded = sum(len(p) for p in prompts) + sum(len(r["ids"]) - 1 for r in results.values())
    assert sum(counted) == forwarded * routers[0].top_k * len(routers), \
        "tokens x top-k x MoE layers (a dense layer counts none)"
    expected = torch.bincount(torch.cat(seen), minlength=load.num_experts).tolist()
    assert counted == expected, "per expert, exactly the routers' choices"
    assert load.take() == [0] * load.num_experts, "take returns what was counted since the previous take"
