"""Qwen3-MoE: a Qwen3 decoder (per-head q/k RMSNorm) whose MLPs are routed SwiGLU experts.

Matches `transformers`' Qwen3MoeForCausalLM on the same weights. Queries and
keys are RMS-normalized per head before rotary; projections carry biases
only if `attention_bias`; `head_dim` comes from the config. Each token's
router picks its top-k experts (softmax, top-k, renormalized if
`norm_topk_prob`); there is no shared expert. Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, use a dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

from moemesh.worker.models.checkpoint import WeightRule
from moemesh.worker.models.decoder import (
    DECODER_CHECKPOINT_RULES,
    QKV_BIAS_RULES,
    DecoderForCausalLM,
    DecoderLayer,
)
from moemesh.worker.models.layers import Attention, SparseMoeBlock, SwiGLUMLP
from moemesh.worker.models.qwen2_moe import QWEN_MOE_MLP_RULES, QwenMoeArgs

CHECKPOINT_MAPPING: tuple[WeightRule, ...] = DECODER_CHECKPOINT_RULES + QKV_BIAS_RULES + QWEN_MOE_MLP_RULES + (
    WeightRule("model.layers.{layer}.self_attn.o_proj.bias", "layers.{layer}.self_attn.o_proj.bias"),
    WeightRule("model.layers.{layer}.self_attn.q_norm.weight", "layers.{layer}.self_attn.q_norm.weight"),
    WeightRule("model.layers.{layer}.self_attn.k_norm.weight", "layers.{layer}.self_attn.k_norm.weight"),
)


@dataclass(frozen=True)
class Qwen3MoeArgs(QwenMoeArgs):
    """The hyper-parameters the model needs, read from config.json."""

    family = "Qwen3-MoE"

    attention_bias: bool  # biases on q/k/v and o projections

    @classmethod
    def from_config(cls, config: dict) -> Qwen3MoeArgs:
        """Read a transformers Qwen3MoeConfig dict; ValueError naming a missing or unsupported field."""
        return cls(**cls.moe_fields(config), attention_bias=bool(config.get("attention_bias", False)))


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """The whole model: ids and positions in, next-token logits out, K/V kept in a paged cache."""

    args_class = Qwen3MoeArgs
    checkpoint_mapping = CHECKPOINT_MAPPING

    def build_layer(self, layer: int) -> DecoderLayer:
        """q/k-normed attention, then a sparse MoE or (off the sparse grid) a dense MLP."""
        args = self.args
        attention = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            qkv_bias=args.attention_bias,
            o_bias=args.attention_bias,
            qk_norm_eps=args.rms_norm_eps,
        )
        if args.is_sparse_layer(layer):
            mlp = SparseMoeBlock(
                args.hidden_size,
                args.num_experts,
                args.num_experts_per_tok,
                args.moe_intermediate_size,
                renormalize=args.norm_topk_prob,
            )
        else:
            mlp = SwiGLUMLP(args.hidden_size, args.intermediate_size)
        return DecoderLayer(args, attention, mlp)
