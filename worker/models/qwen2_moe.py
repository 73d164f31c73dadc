"""Qwen2-MoE (Qwen1.5-MoE): a Qwen2 decoder whose MLPs are routed SwiGLU experts plus a gated shared expert.

Matches `transformers`' Qwen2MoeForCausalLM on the same weights. Attention
has biased q/k/v projections. In a sparse layer each token's router picks
its top-k experts (softmax, top-k, renormalized only if `norm_topk_prob`)
and a shared expert, scaled by `sigmoid(shared_expert_gate(x))`, is added
for every token. Layers listed in `mlp_only_layers`, or off the
`decoder_sparse_step` grid, use a dense MLP instead.

The family-agnostic Qwen MoE parts (`QwenMoeArgs`, `QWEN_MOE_MLP_RULES`)
are shared with Qwen3-MoE, as in transformers' own lineage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moemesh.worker.models.checkpoint import WeightRule
from moemesh.worker.models.decoder import (
    DECODER_CHECKPOINT_RULES,
    QKV_BIAS_RULES,
    DecoderArgs,
    DecoderForCausalLM,
    DecoderLayer,
)
from moemesh.worker.models.layers import Attention, Linear, SparseMoeBlock, SwiGLUMLP

# The MLP checkpoint names of the Qwen MoE families, dense and sparse layers alike.
QWEN_MOE_MLP_RULES: tuple[WeightRule, ...] = (
    # dense layers (mlp_only_layers, or off the decoder_sparse_step grid)
    WeightRule("model.layers.{layer}.mlp.gate_proj.weight", "layers.{layer}.mlp.gate_up_proj.weight", "gate"),
    WeightRule("model.layers.{layer}.mlp.up_proj.weight", "layers.{layer}.mlp.gate_up_proj.weight", "up"),
    WeightRule("model.layers.{layer}.mlp.down_proj.weight", "layers.{layer}.mlp.down_proj.weight"),
    # router, and one matrix per expert as published and as save_pretrained writes them
    WeightRule("model.layers.{layer}.mlp.gate.weight", "layers.{layer}.mlp.gate.weight"),
    WeightRule("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight", "layers.{layer}.mlp.experts.w13", "w1"),
    WeightRule("model.layers.{layer}.mlp.experts.{expert}.up_proj.weight", "layers.{layer}.mlp.experts.w13", "w3"),
    WeightRule("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight", "layers.{layer}.mlp.experts.w2"),
    # transformers 5 in-memory names, in a state dict saved as-is: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    WeightRule("model.layers.{layer}.mlp.experts.gate_up_proj", "layers.{layer}.mlp.experts.w13"),
    WeightRule("model.layers.{layer}.mlp.experts.down_proj", "layers.{layer}.mlp.experts.w2"),
)

CHECKPOINT_MAPPING: tuple[WeightRule, ...] = DECODER_CHECKPOINT_RULES + QKV_BIAS_RULES + QWEN_MOE_MLP_RULES + (
    WeightRule("model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
               "layers.{layer}.mlp.shared_expert.gate_up_proj.weight", "gate"),
    WeightRule("model.layers.{layer}.mlp.shared_expert.up_proj.weight",
               "layers.{layer}.mlp.shared_expert.gate_up_proj.weight", "up"),
    WeightRule("model.layers.{layer}.mlp.shared_expert.down_proj.weight",
               "layers.{layer}.mlp.shared_expert.down_proj.weight"),
    WeightRule("model.layers.{layer}.mlp.shared_expert_gate.weight", "layers.{layer}.mlp.shared_expert_gate.weight"),
)

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class QwenMoeArgs(DecoderArgs):
    """What the Qwen MoE families add to the decoder: expert sizes, routing, which layers are sparse."""

    intermediate_size: int  # dense layers' MLP
    moe_intermediate_size: int  # each routed expert's MLP
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool  # renormalize the top-k routing weights to sum to 1
    decoder_sparse_step: int
    mlp_only_layers: frozenset[int]

    @classmethod
    def moe_fields(cls, config: dict) -> dict:
        """The decoder fields plus the MoE ones; ValueError naming a missing or invalid field."""
        fields = cls.decoder_fields(config)
        # transformers 5 saves Qwen3-MoE's expert count under its alias num_local_experts.
        experts_key = "num_experts" if config.get("num_experts") is not None else "num_local_experts"
        decoder_sparse_step = config.get("decoder_sparse_step", 1)
        if not isinstance(decoder_sparse_step, int) or decoder_sparse_step < 1:
            raise ValueError(
                f"config.json: decoder_sparse_step must be a positive integer, got {decoder_sparse_step!r}"
            )
        # Qwen configs keep a window size even when use_sliding_window (off by default) turns it off.
        fields["sliding_window"] = (config.get("sliding_window") or None) if config.get("use_sliding_window") else None
        return fields | dict(
            intermediate_size=cls.required(config, "intermediate_size"),
            moe_intermediate_size=cls.required(config, "moe_intermediate_size"),
            num_experts=cls.required(config, experts_key),
            num_experts_per_tok=cls.required(config, "num_experts_per_tok"),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            decoder_sparse_step=decoder_sparse_step,
            mlp_only_layers=frozenset(config.get("mlp_only_layers") or ()),
        )

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether `layer` routes to experts (else it has a dense MLP), by transformers' rule."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class Qwen2MoeArgs(QwenMoeArgs):
    """The hyper-parameters the model needs, read from config.json."""

    family = "Qwen2-MoE"

    shared_expert_intermediate_size: int
    qkv_bias: bool
    layer_types: tuple[str, ...]  # per layer: "full_attention" or "sliding_attention"

    @classmethod
    def from_config(cls, config: dict) -> Qwen2MoeArgs:
        """Read a transformers Qwen2MoeConfig dict; ValueError naming a missing or unsupported field."""
        fields = cls.moe_fields(config)
        return cls(
            **fields,
            shared_expert_intermediate_size=cls.required(config, "shared_expert_intermediate_size"),
            qkv_bias=bool(config.get("qkv_bias", True)),
            layer_types=_layer_types(config, fields["num_layers"]),
        )

    def layer_sliding_window(self, layer: int) -> int | None:
        """Only "sliding_attention" layers slide."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def _layer_types(config: dict, num_layers: int) -> tuple[str, ...]:
    """config's layer_types, or transformers' default: every other layer below max_window_layers slides."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        slides = config.get("use_sliding_window", False)
        max_window_layers = config.get("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if slides and (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    if len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise ValueError(f"config.json: layer_types must list one of {LAYER_TYPES} per layer, got {layer_types!r}")
    return tuple(layer_types)


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):
    """Routed experts plus a shared expert every token uses, scaled by a sigmoid gate.

    `forward` = `run_experts(x, *route(x)) + run_shared_expert(x)`: when the
    routed experts run elsewhere, the shared one stays with the layer, and
    is computed while the other ranks compute theirs.
    """

    def __init__(self, args: Qwen2MoeArgs) -> None:
        super().__init__(
            args.hidden_size,
            args.num_experts,
            args.num_experts_per_tok,
            args.moe_intermediate_size,
            renormalize=args.norm_topk_prob,
        )
        self.shared_expert = SwiGLUMLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(args.hidden_size, 1, bias=False)

    def run_shared_expert(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> sigmoid(gate) * shared expert [T, H]."""
        return torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, H]; the shared expert runs while other ranks compute their routed experts."""
        return self.run_experts(hidden, *self.route(hidden), alongside=lambda: self.run_shared_expert(hidden))


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    """The whole model: ids and positions in, next-token logits out, K/V kept in a paged cache."""

    args_class = Qwen2MoeArgs
    checkpoint_mapping = CHECKPOINT_MAPPING

    def build_layer(self, layer: int) -> DecoderLayer:
        """Biased-qkv attention, then the shared-expert MoE or (off the sparse grid) a dense MLP."""
        args = self.args
        attention = Attention(
            args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim, qkv_bias=args.qkv_bias
        )
        if args.is_sparse_layer(layer):
            mlp = Qwen2MoeSparseMoeBlock(args)
        else:
            mlp = SwiGLUMLP(args.hidden_size, args.intermediate_size)
        return DecoderLayer(args, attention, mlp)
