"""The decoder-only skeleton every model family shares, and the config.json fields they all read.

A family supplies its hyper-parameters (a `DecoderArgs` subclass), one
decoder layer per index (`build_layer`) and its checkpoint table; the
embedding, final norm, LM head, rotary table, KV cache and the forward over
the paged cache live here once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import nn

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.models.batch import ForwardBatch
from moemesh.worker.models.checkpoint import WeightRule
from moemesh.worker.models.layers import Linear, OpModule, RMSNorm, RotaryEmbedding, Rotation
from moemesh.worker.ops.backends import Target

# Checkpoint names every family shares: embeddings, head, norms, attention projections.
DECODER_CHECKPOINT_RULES: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", "embed_tokens.weight"),
    WeightRule("model.norm.weight", "norm.weight"),
    WeightRule("lm_head.weight", "lm_head.weight"),
    WeightRule("model.layers.{layer}.input_layernorm.weight", "layers.{layer}.input_layernorm.weight"),
    WeightRule(
        "model.layers.{layer}.post_attention_layernorm.weight", "layers.{layer}.post_attention_layernorm.weight"
    ),
    WeightRule("model.layers.{layer}.self_attn.q_proj.weight", "layers.{layer}.self_attn.qkv_proj.weight", "q"),
    WeightRule("model.layers.{layer}.self_attn.k_proj.weight", "layers.{layer}.self_attn.qkv_proj.weight", "k"),
    WeightRule("model.layers.{layer}.self_attn.v_proj.weight", "layers.{layer}.self_attn.qkv_proj.weight", "v"),
    WeightRule("model.layers.{layer}.self_attn.o_proj.weight", "layers.{layer}.self_attn.o_proj.weight"),
    WeightRule("model.layers.{layer}.self_attn.rotary_emb.inv_freq", None),  # recomputed from rope_theta
)

# Biases of the q/k/v projections, for the families that have them (filling the fused qkv bias).
QKV_BIAS_RULES: tuple[WeightRule, ...] = (
    WeightRule("model.layers.{layer}.self_attn.q_proj.bias", "layers.{layer}.self_attn.qkv_proj.bias", "q"),
    WeightRule("model.layers.{layer}.self_attn.k_proj.bias", "layers.{layer}.self_attn.qkv_proj.bias", "k"),
    WeightRule("model.layers.{layer}.self_attn.v_proj.bias", "layers.{layer}.self_attn.qkv_proj.bias", "v"),
)


@dataclass(frozen=True)
class DecoderArgs:
    """The hyper-parameters every family reads from config.json; subclasses add their own."""

    family: ClassVar[str] = "decoder"  # names the model in config errors
    default_rms_norm_eps: ClassVar[float] = 1e-6
    default_rope_theta: ClassVar[float] = 10000.0

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None  # window of the layers that slide; None when none does
    tie_word_embeddings: bool

    @classmethod
    def decoder_fields(cls, config: dict) -> dict[str, Any]:
        """The shared fields, read from a transformers config dict; ValueError naming a bad field."""
        check_supported(config)
        hidden_size = cls.required(config, "hidden_size")
        num_heads = cls.required(config, "num_attention_heads")
        return dict(
            vocab_size=cls.required(config, "vocab_size"),
            hidden_size=hidden_size,
            num_layers=cls.required(config, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", cls.default_rms_norm_eps),
            rope_theta=rope_theta(config, cls.default_rope_theta),
            max_position_embeddings=cls.required(config, "max_position_embeddings"),
            sliding_window=config.get("sliding_window"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def required(cls, config: dict, name: str):
        """config[name]; ValueError if it is missing."""
        if config.get(name) is None:
            raise ValueError(f"config.json has no {name!r}, which a {cls.family} model needs")
        return config[name]

    def layer_sliding_window(self, layer: int) -> int | None:
        """How far back `layer`'s queries see (None: the whole sequence)."""
        return self.sliding_window


def rope_theta(config: dict, default: float) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level field."""
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or config.get("rope_theta") or default)


def check_supported(config: dict) -> None:
    """ValueError naming a config field whose value no family here implements."""
    rope_type = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {config['hidden_act']!r} is not supported (only 'silu')")


class DecoderLayer(nn.Module):
    """Pre-norm attention then a pre-norm MLP (dense or sparse, [T, H] -> [T, H]), each with a residual."""

    def __init__(self, args: DecoderArgs, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self, h: torch.Tensor, batch: ForwardBatch, rotation: Rotation, cache: PagedKVCache, layer: int
    ) -> torch.Tensor:
        """h [N, H] -> [N, H]."""
        attended = self.self_attn(self.input_layernorm(h), batch, rotation, cache, layer)
        x, h = self.post_attention_layernorm.add_norm(attended, h)  # h + attended, and its norm
        return h + self.mlp(x)


class DecoderForCausalLM(nn.Module):
    """A flat batch of new tokens in, next-token logits out, K/V kept in a paged cache.

    Subclasses set `args_class` and `checkpoint_mapping` and build each layer
    in `build_layer`; a layer is called as `layer(h [N, H], batch, rotation, cache, index)`.
    """

    args_class: ClassVar[type[DecoderArgs]]
    checkpoint_mapping: ClassVar[tuple[WeightRule, ...]]

    def __init__(self, args: DecoderArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(self.build_layer(layer) for layer in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta)
        self.tie_weights()

    @classmethod
    def from_config(cls, config: dict) -> Self:
        """Build (unloaded) from a config.json dict."""
        return cls(cls.args_class.from_config(config))

    def build_layer(self, layer: int) -> nn.Module:
        """Decoder layer number `layer`."""
        raise NotImplementedError

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (moving the model unties)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def choose_backends(self, relayout: bool = True) -> int:
        """Give every operation its backend for the model's device and dtype, once, at load (see worker/ops).

        With `relayout`, weights also take the layout of the kernel that reads
        them (the native kernel's panels, oneDNN's packed copies) and are held
        in that layout only; a weight that another module also holds (the
        embedding of a tied head) keeps its plain copy. Returns how many
        modules laid their weights out anew.
        """
        target = Target.of(self.embed_tokens.weight, relayout)
        holders = Counter(id(param) for module in self.modules() for param in module.parameters(recurse=False))
        relaid = 0
        for module in self.modules():
            if isinstance(module, OpModule):
                alone = all(holders[id(param)] == 1 for param in module.parameters(recurse=False))
                relaid += module.choose_backend(target, release=alone)
        return relaid

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step can be captured in a CUDA graph: every operation's backend keeps it on the device."""
        return all(module.backend.graph_safe for module in self.modules() if isinstance(module, OpModule))

    @property
    def num_layers(self) -> int:
        return self.args.num_layers

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def max_context_tokens(self) -> int:
        return self.args.max_position_embeddings

    @property
    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window (None: it attends to the whole sequence)."""
        return [self.args.layer_sliding_window(layer) for layer in range(self.num_layers)]

    def make_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        """A zeroed paged KV cache of `num_blocks` blocks, on the model's device and in its dtype."""
        weight = self.embed_tokens.weight
        return PagedKVCache(
            self.num_layers, num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim, weight.dtype,
            weight.device,
        )

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Float32 logits [S, V] of the rows in `batch.logits_indices` (every row [N, V] when None).

        Writes every new token's K/V to its cache slot; a token attends to its
        sequence's positions up to its own, so earlier positions must already
        be in the cache.
        """
        h = self.hidden_states(batch, cache)
        if batch.logits_indices is not None:
            h = h.index_select(0, batch.logits_indices)
        return self.lm_head(h).float()

    @torch.inference_mode()
    def hidden_states(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """The final-norm hidden state of every row: [N, H] in the model's dtype."""
        cos, sin = self.rotary(batch.positions)
        rotation = Rotation(cos, sin)
        h = self.embed_tokens(batch.input_ids)  # [N, H]
        for layer, block in enumerate(self.layers):
            h = block(h, batch, rotation, cache, layer)
        return self.norm(h)
