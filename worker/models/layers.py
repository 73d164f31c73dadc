"""Building blocks shared by the model families: norm, rotary, attention, MLPs, experts.

Shapes use B (sequences in the batch), T (new tokens per sequence), L (key
positions attended to), H (hidden size), D (head dim), E (experts), k (experts
per token), I (expert intermediate size). Modules are plain PyTorch; models
build them on the meta device and the checkpoint loader fills them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.worker.kv_cache import SlotKVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, "rotate_half" layout, for arbitrary position ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions [B, T]: 2 x [B, T, D], float32."""
        # Computed per call rather than kept as a buffer: it is D/2 numbers, and
        # the model is built on the meta device where a buffer would be lost.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # [D/2]
        freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, D] by cos, sin [B, T, D]."""
    cos = cos.to(x.dtype)[:, :, None]  # [B, T, 1, D]
    sin = sin.to(x.dtype)[:, :, None]
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class AttentionBatch:
    """What every attention layer of one forward shares: where tokens go, what they see."""

    slots: torch.Tensor  # [B] cache slot of each sequence
    positions: torch.Tensor  # [B, T] position of each new token
    kv_len: int  # keys attended to: positions [0, kv_len) of each slot
    mask: torch.Tensor  # [B, 1, T, kv_len] True where a query may attend to a key
    cos: torch.Tensor  # [B, T, D]
    sin: torch.Tensor  # [B, T, D]

    @classmethod
    def build(
        cls,
        positions: torch.Tensor,
        slots: torch.Tensor,
        rotary: RotaryEmbedding,
        sliding_window: int | None = None,
    ) -> AttentionBatch:
        """Causal mask from positions: a query sees its slot's keys at positions <= its own."""
        kv_len = int(positions.max()) + 1  # keys past the furthest query are never needed
        key_positions = torch.arange(kv_len, device=positions.device)  # [L]
        query_positions = positions[:, :, None]  # [B, T, 1]
        mask = key_positions <= query_positions  # [B, T, L]
        if sliding_window is not None:
            mask &= key_positions > query_positions - sliding_window
        cos, sin = rotary(positions)
        return cls(slots, positions, kv_len, mask[:, None], cos, sin)


class QKVLinear(nn.Linear):
    """q, k and v projections fused into one matmul; rows (and bias entries) are [q | k | v]."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, q_size + 2 * kv_size, bias=bias)
        self.sizes = (q_size, kv_size, kv_size)
        # Rows of the fused weight that each checkpoint matrix fills: (start, size).
        self.shard_offsets = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}


class Attention(nn.Module):
    """Grouped-query attention over the slot KV cache.

    Options for the families that need them: biases on the q/k/v projections
    (`qkv_bias`) and on the output projection (`o_bias`), and a per-head
    RMSNorm of queries and keys before rotary (`qk_norm_eps`, None for none).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.qkv_proj = QKVLinear(hidden_size, num_heads, num_kv_heads, head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        # Identity keeps the forward branch-free and adds no parameters.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else nn.Identity()

    def forward(self, x: torch.Tensor, batch: AttentionBatch, cache: SlotKVCache, layer: int) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; stores this step's keys and values in the cache."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim))
        q = apply_rotary(q, batch.cos, batch.sin)
        k = apply_rotary(k, batch.cos, batch.sin)
        cache.write(layer, batch.slots, batch.positions, k, v.view(B, T, self.num_kv_heads, self.head_dim))
        keys, values = cache.read(layer, batch.slots, batch.kv_len)  # [B, L, n_kv, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, n_heads, T, D]
            keys.transpose(1, 2),  # [B, n_kv, L, D]
            values.transpose(1, 2),
            attn_mask=batch.mask,
            enable_gqa=True,
        )  # [B, n_heads, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class GateUpLinear(nn.Linear):
    """gate and up projections of a SwiGLU MLP fused into one matmul; rows are [gate | up]."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__(hidden_size, 2 * intermediate_size, bias=False)
        # Rows of the fused weight that each checkpoint matrix fills: (start, size).
        self.shard_offsets = {"gate": (0, intermediate_size), "up": (intermediate_size, intermediate_size)}


class SwiGLUMLP(nn.Module):
    """A dense SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x [..., I]
        return self.down_proj(F.silu(gate) * up)


class TopKRouter(nn.Module):
    """Softmax over router logits, top-k, optionally renormalized to sum to 1."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k], topk_weights [T, k] float32)."""
        probs = F.linear(x, self.weight).float().softmax(dim=-1)  # [T, E]
        topk_weights, topk_ids = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_ids, topk_weights


class MoEExperts(nn.Module):
    """SwiGLU experts stacked in tensors, addressed by expert index.

    w13 [E, 2I, H] holds each expert's gate (w1) rows then up (w3) rows;
    w2 [E, H, I] is the down projection.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Rows of one expert's w13 that each checkpoint matrix fills: (start, size).
        self.shard_offsets = {"w1": (0, intermediate_size), "w3": (intermediate_size, intermediate_size)}

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Weighted sum of each token's experts: x [T, H] -> [T, H].

        With `expert_ids`, only those experts are computed and the others
        contribute nothing, so that the sum of the outputs over a partition
        of the experts equals the full output.
        """
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()  # [T*k] expert of each (token, choice)
        order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        token_of = order // k  # [T*k] token of each grouped assignment
        weight_of = topk_weights.flatten()[order]  # [T*k]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync
        wanted = range(self.num_experts) if expert_ids is None else {int(e) for e in expert_ids}
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):  # a loop over experts, never over tokens
            rows = slice(start, start + count)
            start += count
            if count == 0 or expert not in wanted:
                continue
            y = self.expert_forward(expert, x[token_of[rows]])  # [n, H]
            out.index_add_(0, token_of[rows], (y * weight_of[rows, None]).to(out.dtype))
        return out

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU MLP: x [n, H] -> [n, H]."""
        gate, up = F.linear(x, self.w13[expert]).chunk(2, dim=-1)  # 2 x [n, I]
        return F.linear(F.silu(gate) * up, self.w2[expert])


class SparseMoeBlock(nn.Module):
    """Router plus routed experts; `forward` = `run_experts(x, *route(x))`.

    Routing and expert work are separate calls so that the experts can be
    split across processes: each runs `run_experts` for its own `expert_ids`
    and the partial outputs sum to the whole.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool = True
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size)

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
        """hidden [T, H] -> [T, H]."""
        return self.run_experts(hidden, *self.route(hidden))
