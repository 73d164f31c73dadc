"""Building blocks shared by the model families: norm, rotary, attention, MLPs, experts.

Shapes use N (token rows of the flat batch), B and T (sequences and new
tokens per sequence of an attention group), L (key positions attended to),
H (hidden size), D (head dim), E (experts), k (experts per token), I
(expert intermediate size). Modules are plain PyTorch; models
build them on the meta device and the checkpoint loader fills them. Each
module that computes an operation of worker/ops (`OpModule`) gets its backend
once, at load (`choose_backend`), and calls it: no module tests for backends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.models.batch import ForwardBatch
from moemesh.worker.ops.attention import AttentionBackend, choose_attention
from moemesh.worker.ops.backends import NOT_CHOSEN, Target
from moemesh.worker.ops.experts import ExpertsBackend, choose_experts
from moemesh.worker.ops.linear import LinearBackend, choose_linear
from moemesh.worker.ops.norm import RMSNormBackend, choose_rms_norm
from moemesh.worker.ops.router import RouterBackend, choose_router


def released(param: nn.Parameter) -> nn.Parameter:
    """An empty stand-in for a weight whose backend holds its own copy (same dtype and device, no memory)."""
    return nn.Parameter(param.new_empty(0), requires_grad=False)


class OpModule(nn.Module):
    """A module whose work is an operation of worker/ops, run on the backend `choose_backend` picked at load."""

    backend = NOT_CHOSEN  # until the model's `choose_backends` runs

    def choose_backend(self, target: Target, release: bool) -> bool:
        """Pick this module's backend for `target`; with `release`, drop the plain weights that no backend reads.

        Returns whether weights were laid out anew for the backend.
        """
        raise NotImplementedError


class Linear(nn.Linear, OpModule):
    """`nn.Linear` on the backend chosen at load (see `ops.linear`)."""

    backend: LinearBackend

    def choose_backend(self, target: Target, release: bool) -> bool:
        if not self.weight.numel():
            return False  # released at an earlier choice: its backend holds the only copy, and stays
        self.backend = choose_linear(self.weight, self.bias, target)
        if release and not self.backend.reads_plain_weight:
            self.weight = released(self.weight)
        return self.backend.relaid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return self.backend(x)


class RMSNorm(OpModule):
    """Root-mean-square norm, computed in float32 (as transformers does); see `ops.norm`."""

    backend: RMSNormBackend

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def choose_backend(self, target: Target, release: bool) -> bool:
        self.backend = choose_rms_norm(self.weight, self.eps, target)
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        return self.backend(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a decoder layer's residual add and the next norm, fused where the
        backend fuses them."""
        return self.backend.add_norm(x, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, "rotate_half" layout, for arbitrary position ids."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions [N]: 2 x [N, D], float32."""
        # Computed per call rather than kept as a buffer: it is D/2 numbers, and
        # the model is built on the meta device where a buffer would be lost.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # [D/2]
        freqs = positions[:, None].float() * inv_freq  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return emb.cos(), emb.sin()


@dataclass
class Rotation:
    """cos and sin of every row of a forward batch, computed once and shared by the layers."""

    cos: torch.Tensor  # [N, D]
    sin: torch.Tensor  # [N, D]


class QKVLinear(Linear):
    """q, k and v projections fused into one matmul; rows (and bias entries) are [q | k | v]."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False) -> None:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, q_size + 2 * kv_size, bias=bias)
        self.sizes = (q_size, kv_size, kv_size)
        # Rows of the fused weight that each checkpoint matrix fills: (start, size).
        self.shard_offsets = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}


class Attention(OpModule):
    """Grouped-query attention over the paged KV cache; see `ops.attention`.

    Options for the families that need them: biases on the q/k/v projections
    (`qkv_bias`) and on the output projection (`o_bias`), and a per-head
    RMSNorm of queries and keys before rotary (`qk_norm_eps`, None for none).
    """

    backend: AttentionBackend

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
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        # Identity keeps the forward branch-free and adds no parameters.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else nn.Identity()

    def choose_backend(self, target: Target, release: bool) -> bool:
        self.backend = choose_attention(self.num_heads, self.num_kv_heads, self.head_dim, target)
        return False

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rotation: Rotation, cache: PagedKVCache, layer: int
    ) -> torch.Tensor:
        """x [N, H] -> [N, H]; stores the new keys and values in the cache, then attends per group."""
        N = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        q = self.q_norm(q.view(N, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(N, self.num_kv_heads, self.head_dim))
        v = v.view(N, self.num_kv_heads, self.head_dim)
        q = self.backend.rotate_and_store(q, k, v, rotation.cos, rotation.sin, batch.slots, cache, layer)
        window = batch.layer_windows[layer]
        outputs = [
            self.backend.attend(q[group.start : group.stop], group, cache, layer, window) for group in batch.groups
        ]
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [N, nh*D], groups are in row order
        return self.o_proj(attended)


class GateUpLinear(Linear):
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
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x [..., I]
        return self.down_proj(F.silu(gate) * up)


class TopKRouter(OpModule):
    """Softmax over router logits, top-k, optionally renormalized to sum to 1; see `ops.router`."""

    backend: RouterBackend

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def choose_backend(self, target: Target, release: bool) -> bool:
        self.backend = choose_router(self.weight, self.top_k, self.renormalize, target)
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k], topk_weights [T, k] float32)."""
        return self.backend(x)


class MoEExperts(OpModule):
    """SwiGLU experts stacked in tensors, addressed by expert index; see `ops.experts`.

    w13 [E', 2I, H] holds each expert's gate (w1) rows then up (w3) rows;
    w2 [E', H, I] is the down projection. E' = E unless the module holds only
    some of the layer's experts (`held_experts`, a rank of an expert-parallel
    replica): then row `expert_rows[e]` is expert e's. A module whose other
    experts live on other ranks gets a `remote` (see `ops.remote`), and its
    backend sends their rows there.
    """

    backend: ExpertsBackend

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, held_experts: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts  # the layer's routed experts, wherever they are held
        self.held_experts = tuple(range(num_experts)) if held_experts is None else tuple(sorted(set(held_experts)))
        self.expert_rows = None if held_experts is None else {e: row for row, e in enumerate(self.held_experts)}
        held = len(self.held_experts)
        self.w13 = nn.Parameter(torch.empty(held, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(held, hidden_size, intermediate_size))
        # Rows of one expert's w13 that each checkpoint matrix fills: (start, size).
        self.shard_offsets = {"w1": (0, intermediate_size), "w3": (intermediate_size, intermediate_size)}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.remote = None  # a RemoteLayer (ops.remote) when other ranks hold some of this layer's experts
        self.expert_load = None  # an ExpertLoad (models.expert_load) counting the router's choices, when one is kept

    def holding(self, experts: Sequence[int]) -> MoEExperts:
        """A module of the same shape holding only `experts` (built on the current default device)."""
        return MoEExperts(self.num_experts, self.hidden_size, self.intermediate_size, experts)

    def choose_backend(self, target: Target, release: bool) -> bool:
        if self.held_experts and not self.w13.numel():
            return False  # released at an earlier choice: its backend holds the only copy, and stays
        local = choose_experts(self.w13, self.w2, target) if self.held_experts else None
        if local is not None and release and not local.reads_plain_weights:
            self.w13, self.w2 = released(self.w13), released(self.w2)
        self.backend = local if self.remote is None else self.remote.backend(local)
        return local is not None and local.relaid

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Weighted sum of each token's experts: x [T, H] -> [T, H].

        With `expert_ids`, only those experts are computed and the others
        contribute nothing, so that the sum of the outputs over a partition
        of the experts equals the full output. `alongside` is more of the
        layer's work (a shared expert) whose [T, H] result is added to the
        sum: where other ranks hold experts it runs while they compute theirs.
        """
        if self.expert_load is not None:
            self.expert_load.add(topk_ids)
        if alongside is not None and self.remote is not None:
            return self.backend(x, topk_ids, topk_weights, expert_ids, alongside=alongside)
        out = self.backend(x, topk_ids, topk_weights, expert_ids)
        return out if alongside is None else out + alongside()


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
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Experts' weighted outputs [T, H]; only `expert_ids` when given; plus `alongside()` when given."""
        return self.experts(hidden, topk_ids, topk_weights, expert_ids, alongside)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, H]."""
        return self.run_experts(hidden, *self.route(hidden))
