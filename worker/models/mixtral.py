"""Mixtral: a Mistral-style decoder whose MLPs are sparse mixtures of SwiGLU experts.

Matches `transformers`' MixtralForCausalLM on the same weights. Each token's
router picks its top-k experts (softmax over the router logits, top-k,
renormalized); the expert work is split into `route` and `run_experts` so
that experts can run in another process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from moemesh.worker.checkpoint import WeightRule
from moemesh.worker.kv_cache import SlotKVCache
from moemesh.worker.models.layers import (
    Attention,
    AttentionBatch,
    MoEExperts,
    RMSNorm,
    RotaryEmbedding,
    TopKRouter,
)
from torch import nn

# Checkpoint name -> parameter. Published Mixtral checkpoints (and
# transformers' save_pretrained, which converts back on save) store one matrix
# per expert; transformers >= 5 holds experts fused in memory, and a state dict
# saved as-is carries those fused names, so both are accepted.
CHECKPOINT_MAPPING: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", "embed_tokens.weight"),
    WeightRule("model.norm.weight", "norm.weight"),
    WeightRule("lm_head.weight", "lm_head.weight"),
    WeightRule("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.input_layernorm.weight"),
    WeightRule("model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.post_attention_layernorm.weight"),
    WeightRule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.self_attn.qkv_proj.weight", "q"),
    WeightRule("model.layers.{layer}.self_attn.k_proj.weight", "layers.{layer}.self_attn.qkv_proj.weight", "k"),
    WeightRule("model.layers.{layer}.self_attn.v_proj.weight", "layers.{layer}.self_attn.qkv_proj.weight", "v"),
    WeightRule("model.layers.{layer}.self_attn.o_proj.weight", "layers.{layer}.self_attn.o_proj.weight"),
    WeightRule("model.layers.{layer}.self_attn.rotary_emb.inv_freq", None),  # recomputed from rope_theta
    # per-expert names: w1 = gate, w3 = up, w2 = down
    WeightRule("model.layers.{layer}.block_sparse_moe.gate.weight", "layers.{layer}.moe.gate.weight"),
    WeightRule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", "layers.{layer}.moe.experts.w13", "w1"),
    WeightRule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", "layers.{layer}.moe.experts.w13", "w3"),
    WeightRule("model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", "layers.{layer}.moe.experts.w2"),
    # transformers 5 in-memory names: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    WeightRule("model.layers.{layer}.mlp.gate.weight", "layers.{layer}.moe.gate.weight"),
    WeightRule("model.layers.{layer}.mlp.experts.gate_up_proj", "layers.{layer}.moe.experts.w13"),
    WeightRule("model.layers.{layer}.mlp.experts.down_proj", "layers.{layer}.moe.experts.w2"),
)


@dataclass(frozen=True)
class MixtralArgs:
    """The hyper-parameters the model needs, read from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> MixtralArgs:
        """Read a transformers MixtralConfig dict; ValueError naming a missing or unsupported field."""
        _check_supported(config)
        hidden_size = _field(config, "hidden_size")
        num_heads = _field(config, "num_attention_heads")
        return cls(
            vocab_size=_field(config, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_field(config, "intermediate_size"),
            num_layers=_field(config, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            num_experts=_field(config, "num_local_experts"),
            num_experts_per_tok=_field(config, "num_experts_per_tok"),
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(config),
            max_position_embeddings=_field(config, "max_position_embeddings"),
            sliding_window=config.get("sliding_window"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def _field(config: dict, name: str):
    if config.get(name) is None:
        raise ValueError(f"config.json has no {name!r}, which a Mixtral model needs")
    return config[name]


def _rope_theta(config: dict) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level field."""
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or config.get("rope_theta") or 1e6)


def _check_supported(config: dict) -> None:
    rope_type = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")


class MixtralSparseMoeBlock(nn.Module):
    """Router plus experts; `forward` = `run_experts(x, *route(x))`."""

    def __init__(self, args: MixtralArgs) -> None:
        super().__init__()
        self.gate = TopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, renormalize=True)
        self.experts = MoEExperts(args.num_experts, args.hidden_size, args.intermediate_size)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (topk_ids [T, k], topk_weights [T, k])."""
        return self.gate(hidden)

    def run_experts(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Experts' weighted outputs [T, H]; only `expert_ids` when given."""
        return self.experts(hidden, topk_ids, topk_weights, expert_ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.run_experts(hidden, *self.route(hidden))


class MixtralDecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm sparse MoE, each with a residual."""

    def __init__(self, args: MixtralArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.moe = MixtralSparseMoeBlock(args)

    def forward(self, h: torch.Tensor, batch: AttentionBatch, cache: SlotKVCache, layer: int) -> torch.Tensor:
        """h [B, T, H] -> [B, T, H]."""
        h = h + self.self_attn(self.input_layernorm(h), batch, cache, layer)
        moe_in = self.post_attention_layernorm(h).flatten(0, 1)  # [B*T, H]
        return h + self.moe(moe_in).view_as(h)


class MixtralForCausalLM(nn.Module):
    """The whole model: ids and positions in, next-token logits out, K/V kept in a slot cache."""

    checkpoint_mapping = CHECKPOINT_MAPPING

    def __init__(self, args: MixtralArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(MixtralDecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta)
        self.tie_weights()

    @classmethod
    def from_config(cls, config: dict) -> MixtralForCausalLM:
        """Build (unloaded) from a config.json dict."""
        return cls(MixtralArgs.from_config(config))

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (moving the model unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def max_context_tokens(self) -> int:
        return self.args.max_position_embeddings

    def make_cache(self, num_slots: int, max_len: int) -> SlotKVCache:
        """A zeroed KV cache for `num_slots` sequences of up to `max_len` tokens, on the model's device."""
        weight = self.embed_tokens.weight
        return SlotKVCache(
            self.num_layers, num_slots, max_len, self.args.num_kv_heads, self.args.head_dim, weight.dtype, weight.device
        )

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: SlotKVCache
    ) -> torch.Tensor:
        """input_ids, positions [B, T], slots [B] -> float32 logits [B, T, V].

        Writes each token's K/V at (slot, position) and lets it attend to its
        slot's cached positions up to its own: positions before those given
        must already be in the cache.
        """
        batch = AttentionBatch.build(positions, slots, self.rotary, self.args.sliding_window)
        if batch.kv_len > cache.max_len:
            raise ValueError(f"position {batch.kv_len - 1} is beyond the cache length {cache.max_len}")
        h = self.embed_tokens(input_ids)  # [B, T, H]
        for layer, block in enumerate(self.layers):
            h = block(h, batch, cache, layer)
        return self.lm_head(self.norm(h)).float()  # [B, T, V]
