"""Which model class serves which checkpoint architecture, and building a loaded model (or a rank's part of it).

`MODEL_REGISTRY` maps the `architectures[0]` name of config.json to a model
class. A model class provides `from_config(config: dict)`, a
`checkpoint_mapping` table of `WeightRule`s and `tie_weights()`.

An expert-parallel replica builds rank 0 with `build_model(...,
expert_parallel=exchange)` (the whole model but the other ranks' experts,
its MoE layers sending those experts' rows over `exchange`) and each shard
with `build_expert_shard` (its experts only).
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.worker.models.checkpoint import Checkpoint, LoadRecord, load_checkpoint
from moemesh.worker.models.expert_parallel import ExpertShardModel, held_parameters, hold_experts, shard_layers
from moemesh.worker.models.mixtral import MixtralForCausalLM
from moemesh.worker.models.placement import ExpertPlacement
from moemesh.worker.models.qwen2_moe import Qwen2MoeForCausalLM
from moemesh.worker.models.qwen3_moe import Qwen3MoeForCausalLM
from moemesh.worker.ops.backends import Target
from moemesh.worker.ops.remote import ExpertExchange

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    """The class serving `architecture`; ValueError naming the supported ones if none does."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: {supported}") from None


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 on CPU (no fast bf16 on these CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return DTYPES[name]


def build_model(
    ckpt: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pack_weights: bool = True,
    *,
    expert_parallel: ExpertExchange | None = None,
    record: LoadRecord | None = None,
) -> nn.Module:
    """Build the checkpoint's model with its weights cast to `dtype` on `device`, ready for inference.

    Every operation then picks its backend for the device and dtype (see
    worker/ops). With `pack_weights` (the default), CPU weights are also laid
    out once for the kernels that read them (the native kernels' panels,
    oneDNN's packed copies); on other devices it changes nothing.

    With `expert_parallel` (an open exchange to the replica's shards), this is
    rank 0 of an expert-parallel replica: it holds and reads only rank 0's
    routed experts under the exchange's placement, and its MoE layers run the
    others on the shards. `record` collects the checkpoint tensors read.
    """
    cls = model_class(ckpt.architecture)
    # Built on the meta device: no memory and no random init for weights that
    # the checkpoint overwrites anyway.
    with torch.device("meta"):
        model = cls.from_config(ckpt.config)
        held = hold_experts(model, expert_parallel.config.placement, 0) if expert_parallel is not None else {}
        model = model.to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_checkpoint(model, ckpt, cls.checkpoint_mapping, record=record)
    model = model.requires_grad_(False).eval()
    placement = expert_parallel.config.placement if expert_parallel is not None else None
    for index, (_, module) in held.items():
        if len(module.held_experts) < module.num_experts:
            module.remote = expert_parallel.layer(index, placement.owners_of(index), module.held_experts)
    model.choose_backends(relayout=pack_weights)
    return model


def build_expert_shard(
    ckpt: Checkpoint,
    placement: ExpertPlacement,
    rank: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    pack_weights: bool = True,
    *,
    record: LoadRecord | None = None,
) -> ExpertShardModel:
    """The routed experts that rank `rank` (> 0) of an expert-parallel replica holds, on its device and dtype.

    Allocates and reads only those experts' weights: no embedding,
    attention, router, norm, shared expert or head, and no other rank's
    expert. `record` collects the checkpoint tensors read.
    """
    if not 0 < rank < placement.world_size:
        raise ValueError(f"rank: a shard's rank is 1..{placement.world_size - 1}, got {rank}")
    cls = model_class(ckpt.architecture)
    with torch.device("meta"):
        model = cls.from_config(ckpt.config)
        layers = hold_experts(model, placement, rank)
        model = model.to(dtype)
    for _, module in layers.values():
        module.to_empty(device=device)  # the rest of the model stays on meta: never allocated
    load_checkpoint(model, ckpt, cls.checkpoint_mapping, only=held_parameters(layers).__contains__, record=record)
    held = shard_layers(layers)
    target = Target(torch.device(device), dtype, pack_weights)
    for module in held.values():
        module.requires_grad_(False).choose_backend(target, release=True)
    return ExpertShardModel(held, placement, rank, torch.device(device), dtype)
