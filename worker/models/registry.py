"""Which model class serves which checkpoint architecture, and building a loaded model.

`MODEL_REGISTRY` maps the `architectures[0]` name of config.json to a model
class. A model class provides `from_config(config: dict)`, a
`checkpoint_mapping` table of `WeightRule`s and `tie_weights()`.
"""

from __future__ import annotations

import torch
from torch import nn

from moemesh.worker.models.checkpoint import Checkpoint, iter_tensors, load_weights
from moemesh.worker.models.mixtral import MixtralForCausalLM
from moemesh.worker.models.qwen2_moe import Qwen2MoeForCausalLM
from moemesh.worker.models.qwen3_moe import Qwen3MoeForCausalLM

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


def build_model(
    ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", pack_weights: bool = True
) -> nn.Module:
    """Build the checkpoint's model with its weights cast to `dtype` on `device`, ready for inference.

    Every operation then picks its backend for the device and dtype (see
    worker/ops). With `pack_weights` (the default), CPU weights are also laid
    out once for the kernels that read them (the native kernels' panels,
    oneDNN's packed copies); on other devices it changes nothing.
    """
    cls = model_class(ckpt.architecture)
    # Built on the meta device: no memory and no random init for weights that
    # the checkpoint overwrites anyway.
    with torch.device("meta"):
        model = cls.from_config(ckpt.config).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, iter_tensors(ckpt), cls.checkpoint_mapping)
    model = model.requires_grad_(False).eval()
    model.choose_backends(relayout=pack_weights)
    return model
