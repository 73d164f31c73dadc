"""Expert load: how many tokens the routers send to each expert, counted where the model runs.

Every MoE layer of a model adds its router's choices into one counter
(`ExpertLoad`), [E] int64 on the model's device: an `index_add_` of the
step's top-k ids per layer, no host sync, and nothing a CUDA graph cannot
capture. The counts are cumulative; `take` reads them once (on the engine
thread, between steps) and returns what was counted since the previous
`take`. A token counts once per MoE layer for each of its top-k experts, so
one step of T tokens through L MoE layers adds T * k * L in all.

On CUDA with graphs, a replayed decode step counts its padding rows too (a
batch is padded up to its captured size); the warm-up and capture passes are
discarded by the `take` that follows the engine's construction.
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.worker.models.expert_parallel import moe_experts


class ExpertLoad:
    """Tokens routed to each expert, summed over MoE layers; `add` in the forward, `take` between steps."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_experts, dtype=torch.int64, device=device)  # [E] cumulative
        self._taken = torch.zeros(num_experts, dtype=torch.int64)  # [E] the cumulative counts at the last take

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    def add(self, topk_ids: torch.Tensor) -> None:
        """Count one layer's choices: topk_ids [T, k]."""
        ids = topk_ids.reshape(-1)
        self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int64))

    def take(self) -> list[int]:
        """[E] tokens counted since the previous take (one device read; call it on the thread running the model)."""
        now = self.counts.to("cpu", copy=True)  # a copy: on the CPU, .cpu() would alias the live counts
        since, self._taken = now - self._taken, now
        return since.tolist()


def count_expert_load(model: nn.Module) -> ExpertLoad | None:
    """Make every MoE layer of `model` count its router's choices into one `ExpertLoad` (None: no MoE layer)."""
    layers = [module for _, module in moe_experts(model).values()]
    if not layers:
        return None
    load = ExpertLoad(layers[0].num_experts, model.embed_tokens.weight.device)
    for module in layers:
        module.expert_load = load
    return load
