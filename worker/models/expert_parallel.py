"""The model side of expert parallelism: which experts each rank's modules hold, and a shard's experts.

`hold_experts` swaps every MoE layer's `MoEExperts` for one holding only a
rank's experts (on the meta device, before any weight is allocated), so that
a rank allocates and reads only its own. Rank 0 keeps the whole model
around its experts; a shard (rank > 0) keeps only its experts:
`ExpertShardModel`, built by `registry.build_expert_shard`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.models.layers import MoEExperts
from moemesh.worker.models.placement import ExpertPlacement
from moemesh.worker.ops.remote import held_rows, run_held


def moe_experts(model: nn.Module) -> dict[int, tuple[str, MoEExperts]]:
    """Decoder layer index -> (module path, experts) of every MoE layer of `model`."""
    found = {}
    for index, layer in enumerate(model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, MoEExperts):
                found[index] = (f"layers.{index}.{name}", module)
    return found


def hold_experts(model: nn.Module, placement: ExpertPlacement, rank: int) -> dict[int, tuple[str, MoEExperts]]:
    """Make each MoE layer of `model` hold only `rank`'s experts under `placement`; returns the new modules.

    Call it on the meta device (the new modules are built on the current default device). ValueError if the
    placement does not fit the model (another expert count, a per-layer map for a layer without experts).
    """
    layers = moe_experts(model)
    unknown = sorted(set(placement.layers) - set(layers))
    if unknown:
        raise ValueError(f"ep_placement: layers {unknown} have no routed experts")
    held = {}
    for index, (path, module) in layers.items():
        if module.num_experts != placement.num_experts:
            raise ValueError(f"ep_placement: places {placement.num_experts} experts, layer {index} has "
                             f"{module.num_experts}")
        parent_path, _, attr = path.rpartition(".")
        replacement = module.holding(placement.experts_of(rank, index))
        setattr(model.get_submodule(parent_path), attr, replacement)
        held[index] = (path, replacement)
    return held


def held_parameters(layers: dict[int, tuple[str, MoEExperts]]) -> set[str]:
    """The parameter names of the held experts' stacks."""
    return {f"{path}.{name}" for path, module in layers.values() for name, _ in module.named_parameters()}


class ExpertShardModel:
    """The routed experts a shard holds, per MoE layer, on its own device and dtype; `compute` answers one layer."""

    def __init__(self, layers: dict[int, MoEExperts], placement: ExpertPlacement, rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.layers, self.placement, self.rank = layers, placement, rank
        self.device, self.dtype = device, dtype
        self.hidden_size = next(iter(layers.values())).hidden_size if layers else 0
        self.rows_of = {index: held_rows(module.num_experts, module.held_experts)
                        for index, module in layers.items()}  # [E] each, host

    def compute(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [n, H], expert_ids [n, k'] (global, valid first, -1 after), weights [n, k'] -> [n, H] partial sums,
        in hidden's dtype on the CPU. InvalidRequest naming the field if the work is not for this shard."""
        ids = self._check(layer, hidden, expert_ids, weights)
        module = self.layers[layer]
        x = hidden.to(device=self.device, dtype=self.dtype)
        host_weights = weights.to(dtype=torch.float32).cpu().numpy()
        out = run_held(module.backend, self.rows_of[layer], x, ids, host_weights)
        return out.to(device="cpu", dtype=hidden.dtype)

    def _check(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
               weights: torch.Tensor) -> np.ndarray:
        """The work's expert ids as a host array; InvalidRequest if the work is not for this shard."""
        if layer not in self.layers or not self.layers[layer].held_experts:
            raise InvalidRequest("layer", f"rank {self.rank} holds no expert of layer {layer}")
        n = hidden.shape[0]
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size or n == 0:
            raise InvalidRequest("hidden", f"expected [n >= 1, {self.hidden_size}], got {list(hidden.shape)}")
        if expert_ids.dim() != 2 or expert_ids.shape[0] != n or expert_ids.is_floating_point() \
                or expert_ids.shape[1] == 0:
            raise InvalidRequest("expert_ids", f"expected integer [{n}, k' >= 1], got {expert_ids.dtype} "
                                               f"{list(expert_ids.shape)}")
        if weights.shape != expert_ids.shape or not weights.is_floating_point():
            raise InvalidRequest("weights", f"expected float [{n}, {expert_ids.shape[1]}], got {weights.dtype} "
                                            f"{list(weights.shape)}")
        ids = expert_ids.cpu().numpy()
        valid = ids >= 0  # [n, k']
        if (ids < -1).any():
            raise InvalidRequest("expert_ids", "expert ids are 0 or more, and -1 marks padding")
        if not valid[:, 0].all() or (valid[:, 1:] > valid[:, :-1]).any():
            raise InvalidRequest("expert_ids", "each row needs at least one expert, the valid ones before any -1")
        rows_of = self.rows_of[layer]  # [E] row of each held expert, -1 for the others
        if (ids >= rows_of.shape[0]).any() or (rows_of[ids[valid]] < 0).any():
            held = set(self.layers[layer].held_experts)
            foreign = sorted({int(e) for e in ids[valid].tolist()} - held)
            raise InvalidRequest("expert_ids", f"rank {self.rank} does not hold experts {foreign} of layer {layer}")
        return ids


def shard_layers(layers: dict[int, tuple[str, MoEExperts]]) -> dict[int, MoEExperts]:
    """The held experts by layer, without the layers where this rank holds none."""
    return {index: module for index, (_, module) in layers.items() if module.held_experts}
