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
from moemesh.worker.ops.remote import held_choices, held_rows, run_rows


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
        self, layer: int, hidden: torch.Tensor, expert_ids: np.ndarray | torch.Tensor,
        weights: np.ndarray | torch.Tensor,
    ) -> torch.Tensor:
        """hidden [n, H], expert_ids [n, k'] (global, valid first, -1 after), weights [n, k'] (host arrays, or CPU
        tensors) -> [n, H] partial sums, in hidden's dtype on the CPU. InvalidRequest naming the field if the
        work is not for this shard."""
        ids, host_weights = _host(expert_ids), _host(weights)
        rows = self._check(layer, hidden, ids, host_weights)
        x = hidden.to(device=self.device, dtype=self.dtype)
        # A copy: the decoded weights view the message's bytes, and torch views writable arrays only.
        out = run_rows(self.layers[layer].backend, x, rows, host_weights.astype(np.float32))
        return out.to(device="cpu", dtype=hidden.dtype)

    def _check(self, layer: int, hidden: torch.Tensor, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The work's choices as rows of the held weights (`held_choices`); InvalidRequest if the work is not for
        this shard."""
        module = self.layers.get(layer)
        if module is None or not module.held_experts:
            raise InvalidRequest("layer", f"rank {self.rank} holds no expert of layer {layer}")
        n = hidden.shape[0]
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size or n == 0:
            raise InvalidRequest("hidden", f"expected [n >= 1, {self.hidden_size}], got {list(hidden.shape)}")
        if ids.ndim != 2 or ids.shape[0] != n or ids.dtype.kind not in "iu" or ids.shape[1] == 0:
            raise InvalidRequest("expert_ids", f"expected integer [{n}, k' >= 1], got {ids.dtype} {list(ids.shape)}")
        if weights.shape != ids.shape or weights.dtype.kind != "f":
            raise InvalidRequest("weights", f"expected float [{n}, {ids.shape[1]}], got {weights.dtype} "
                                            f"{list(weights.shape)}")
        rows = held_choices(self.rows_of[layer], ids)
        if rows is None:
            self._refuse(layer, ids)
        return rows

    def _refuse(self, layer: int, ids: np.ndarray) -> None:
        """Raise InvalidRequest naming what is wrong with ids that `held_choices` refused."""
        valid = ids >= 0
        if (ids < -1).any():
            raise InvalidRequest("expert_ids", "expert ids are 0 or more, and -1 marks padding")
        if not valid[:, 0].all() or (valid[:, 1:] > valid[:, :-1]).any():
            raise InvalidRequest("expert_ids", "each row needs at least one expert, the valid ones before any -1")
        held = set(self.layers[layer].held_experts)
        foreign = sorted({int(e) for e in ids[valid].tolist()} - held)
        raise InvalidRequest("expert_ids", f"rank {self.rank} does not hold experts {foreign} of layer {layer}")


def _host(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """A host array of routing values (a CPU tensor's shares its memory; bfloat16, which numpy lacks, widens)."""
    if not isinstance(values, torch.Tensor):
        return values
    values = values.detach().cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def shard_layers(layers: dict[int, tuple[str, MoEExperts]]) -> dict[int, MoEExperts]:
    """The held experts by layer, without the layers where this rank holds none."""
    return {index: module for index, (_, module) in layers.items() if module.held_experts}
