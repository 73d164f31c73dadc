"""Mixtral: a Mistral-style decoder whose MLPs are sparse mixtures of SwiGLU experts.

Matches `transformers`' MixtralForCausalLM on the same weights. Each token's
router picks its top-k experts (softmax over the router logits, top-k,
renormalized); the expert work is split into `route` and `run_experts` so
that experts can run in another process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.models.batch import ForwardBatch
from moemesh.worker.models.checkpoint import WeightRule
from moemesh.worker.models.decoder import DECODER_CHECKPOINT_RULES, DecoderArgs, DecoderForCausalLM
from moemesh.worker.models.layers import Attention, RMSNorm, Rotation, SparseMoeBlock

# Checkpoint name -> parameter. Published Mixtral checkpoints (and
# transformers' save_pretrained, which converts back on save) store one matrix
# per expert; transformers >= 5 holds experts fused in memory, and a state dict
# saved as-is carries those fused names, so both are accepted.
CHECKPOINT_MAPPING: tuple[WeightRule, ...] = DECODER_CHECKPOINT_RULES + (
    # per-expert names: w1 = gate, w3 = up, w2 = down
    WeightRule("model.layers.{layer}.block_sparse_moe.gate.weight", "layers.{layer}.moe.gate.weight"),
    WeightRule(
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", "layers.{layer}.moe.experts.w13", "w1"
    ),
    WeightRule(
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", "layers.{layer}.moe.experts.w13", "w3"
    ),
    WeightRule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", "layers.{layer}.moe.experts.w2"),
    # transformers 5 in-memory names: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    WeightRule("model.layers.{layer}.mlp.gate.weight", "layers.{layer}.moe.gate.weight"),
    WeightRule("model.layers.{layer}.mlp.experts.gate_up_proj", "layers.{layer}.moe.experts.w13"),
    WeightRule("model.layers.{layer}.mlp.experts.down_proj", "layers.{layer}.moe.experts.w2"),
)


@dataclass(frozen=True)
class MixtralArgs(DecoderArgs):
    """The hyper-parameters the model needs, read from config.json."""

    family = "Mixtral"
    default_rms_norm_eps = 1e-5
    default_rope_theta = 1e6

    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int

    @classmethod
    def from_config(cls, config: dict) -> MixtralArgs:
        """Read a transformers MixtralConfig dict; ValueError naming a missing or unsupported field."""
        return cls(
            **cls.decoder_fields(config),
            intermediate_size=cls.required(config, "intermediate_size"),
            num_experts=cls.required(config, "num_local_experts"),
            num_experts_per_tok=cls.required(config, "num_experts_per_tok"),
        )


class MixtralSparseMoeBlock(SparseMoeBlock):
    """Router plus experts, top-k weights renormalized; `forward` = `run_experts(x, *route(x))`."""

    def __init__(self, args: MixtralArgs) -> None:
        super().__init__(
            args.hidden_size, args.num_experts, args.num_experts_per_tok, args.intermediate_size, renormalize=True
        )


class MixtralDecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm sparse MoE, each with a residual."""

    def __init__(self, args: MixtralArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.moe = MixtralSparseMoeBlock(args)

    def forward(
        self, h: torch.Tensor, batch: ForwardBatch, rotation: Rotation, cache: PagedKVCache, layer: int
    ) -> torch.Tensor:
        """h [N, H] -> [N, H]."""
        attended = self.self_attn(self.input_layernorm(h), batch, rotation, cache, layer)
        x, h = self.post_attention_layernorm.add_norm(attended, h)  # h + attended, and its norm
        return h + self.moe(x)


class MixtralForCausalLM(DecoderForCausalLM):
    """The whole model: ids and positions in, next-token logits out, K/V kept in a paged cache."""

    args_class = MixtralArgs
    checkpoint_mapping = CHECKPOINT_MAPPING

    def build_layer(self, layer: int) -> MixtralDecoderLayer:
        """Every Mixtral layer is attention plus a sparse MoE."""
        return MixtralDecoderLayer(self.args)
