"""Building blocks shared by the model families: norm, rotary, attention, MLPs, experts.

Shapes use N (token rows of the flat batch), B and T (sequences and new
tokens per sequence of an attention group), L (key positions attended to), H (hidden size), D (head dim), E (experts), k (experts
per token), I (expert intermediate size). Modules are plain PyTorch; models
build them on the meta device and the checkpoint loader fills them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.models.batch import AttentionGroup, ForwardBatch
from moemesh.worker.ops import native
from moemesh.worker.ops.packing import pack_weight, packed_linear, packing_available


def released(param: nn.Parameter) -> nn.Parameter:
    """An empty stand-in for a weight whose packed copy replaces it (same dtype and device, no memory)."""
    return nn.Parameter(param.new_empty(0), requires_grad=False)


# Most token rows a dense projection sends to the native kernel (float32 CPU); more go to oneDNN. Over
# the bench checkpoint's projections (8 layers of q/k/v and o, and the head) on the 2-core bench machine
# (bench/native_bench.py --rows N), the kernel on the panel layout measured 1.7x faster than oneDNN-packed
# weights at 8 rows, 1.17x at 32, 1.08x at 64 and even at 128; on the plain layout (for output sizes the
# panels cannot hold) 1.14x at 32 rows and 0.96x at 48 and 64.
NATIVE_PANEL_ROWS = 64
NATIVE_LINEAR_ROWS = 32


class Linear(nn.Linear):
    """`nn.Linear` whose weight can be laid out once for faster CPU kernels; see `pack`."""

    packed: torch.Tensor | None = None  # oneDNN's blocked layout (`packing`)
    panels: torch.Tensor | None = None  # the native kernel's panel layout (`native.pack_linear`)

    def pack(self, release: bool) -> bool:
        """Lay the weight out for the kernels the device and dtype allow.

        Where the native kernels run (float32 on the CPU), small batches
        (single-stream and decode steps) take the native kernel on panels of
        32 output columns, and larger ones (prefill) oneDNN's packed copy.
        With `release`, the plain weight is dropped when those copies serve
        every batch; it stays where the native kernel reads it (an output
        size the panels cannot hold) or oneDNN cannot pack.
        """
        if self.packed is not None or self.panels is not None:
            return False
        native_here = native.kernels_supported(self.weight)
        if native_here and self.out_features % 32 == 0:
            self.panels = native.pack_linear(self.weight.detach())
        if packing_available(self.weight):
            self.packed = pack_weight(self.weight)
        if self.packed is None and self.panels is None:
            return False
        if release and self.packed is not None and (self.panels is not None or not native_here):
            self.weight = released(self.weight)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.kernels_supported(x):
            if self.panels is not None and x.numel() <= NATIVE_PANEL_ROWS * self.in_features:
                return native.linear(x, self.panels, self.bias)
            if self.weight.numel() and x.numel() <= NATIVE_LINEAR_ROWS * self.in_features:
                return native.linear(x, self.weight, self.bias)
        if self.packed is None:
            return super().forward(x)
        return packed_linear(x, self.packed, self.out_features, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 (as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.kernels_supported(x) and self.weight.dtype == x.dtype:
            return native.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a decoder layer's residual add and the next norm, in one pass
        where the native kernels run."""
        if native.kernels_supported(x) and self.weight.dtype == x.dtype == residual.dtype:
            return native.rms_norm(x, self.weight, self.eps, residual)
        summed = x + residual
        return self(summed), summed


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by cos, sin [N, D]."""
    cos = cos.to(x.dtype)[:, None]  # [N, 1, D]
    sin = sin.to(x.dtype)[:, None]
    return x * cos + rotate_half(x) * sin


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


class Attention(nn.Module):
    """Grouped-query attention over the paged KV cache.

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
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        # Identity keeps the forward branch-free and adds no parameters.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else nn.Identity()
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rotation: Rotation, cache: PagedKVCache, layer: int
    ) -> torch.Tensor:
        """x [N, H] -> [N, H]; stores the new keys and values in the cache, then attends per group."""
        N = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)
        q = self.q_norm(q.view(N, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(N, self.num_kv_heads, self.head_dim))
        v = v.view(N, self.num_kv_heads, self.head_dim)
        if native.kernels_supported(q) and cache.k[layer].dtype == q.dtype:
            # One pass: rotate q and k, store k and v in their cache slots (the same as the lines below).
            q = native.rotary_store(q, k, v, rotation.cos, rotation.sin, batch.slots, cache.k[layer], cache.v[layer])
        else:
            q = apply_rotary(q, rotation.cos, rotation.sin)
            cache.write(layer, batch.slots, apply_rotary(k, rotation.cos, rotation.sin), v)
        window = batch.layer_windows[layer]
        outputs = [self._attend(q[group.start : group.stop], group, cache, layer, window) for group in batch.groups]
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [N, nh*D], groups are in row order
        return self.o_proj(attended)

    def _attend(
        self, q: torch.Tensor, group: AttentionGroup, cache: PagedKVCache, layer: int, window: int | None
    ) -> torch.Tensor:
        """One group's queries q [B*T, nh, D] against their cached keys -> [B*T, nh*D]."""
        B, T = group.num_seqs, group.num_tokens
        if T == 1 and native.kernels_supported(q):  # the cache has the model dtype, as q does
            # Decode: the native kernel reads each sequence's blocks in place, no gathered copy.
            out = native.paged_decode_attention(q, cache.k[layer], cache.v[layer], group.block_tables, group.seq_lens, window)
            return out.view(B, self.num_heads * self.head_dim)
        keys, values = cache.gather(layer, group.block_tables)  # [B, nb*bs, n_kv, D]
        queries = q.view(B, T, self.num_heads, self.head_dim)
        keys, values = keys[:, : group.kv_len], values[:, : group.kv_len]
        # PyTorch's CPU attention kernel is several times slower in 16-bit floats than in float32
        # (measured: bf16 2.4 ms vs fp32 0.4 ms for a 32-sequence decode); the casts cost far less.
        if q.device.type == "cpu" and q.dtype != torch.float32:
            queries, keys, values = queries.float(), keys.float(), values.float()
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),  # [B, nh, T, D]
            keys.transpose(1, 2),  # [B, n_kv, L, D]
            values.transpose(1, 2),
            attn_mask=group.masks[window],
            enable_gqa=True,
        )  # [B, nh, T, D]
        return out.transpose(1, 2).reshape(B * T, self.num_heads * self.head_dim).to(q.dtype)


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


class TopKRouter(nn.Module):
    """Softmax over router logits, top-k, optionally renormalized to sum to 1."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k], topk_weights [T, k] float32)."""
        if native.kernels_supported(x) and self.weight.dtype == x.dtype:
            return native.route(x, self.weight, self.top_k, self.renormalize)
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
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        # Per-expert weights packed for oneDNN (see `pack`); None: the stacked tensors are used.
        self.packed13: list[torch.Tensor] | None = None
        self.packed2: list[torch.Tensor] | None = None
        # The same weights in the native kernel's panel layout (see `pack`); None: not packed so.
        self.panels: tuple[torch.Tensor, torch.Tensor] | None = None

    def pack(self, release: bool) -> bool:
        """Lay the experts out once for the fastest kernel the device and dtype allow.

        Where the native kernels run (float32 on the CPU), that is the native
        kernel's panel layout (`native.pack_experts`): 1.08x faster than the
        checkpoint layout in a decode step and 1.15x at prefill, and 1.7x and
        1.08x faster than oneDNN (bench/native_bench.py). Experts whose sizes
        the panels cannot hold keep the checkpoint layout, which the kernel
        also reads. Elsewhere each expert's matrices are packed for oneDNN.
        Every expert path then runs on the packed copies; with `release` the
        stacked tensors are dropped, so the weights are held once.
        """
        if self.packed13 is not None or self.panels is not None:
            return False
        if native.kernels_supported(self.w13):
            if not native.experts_packable(self.hidden_size, self.intermediate_size):
                return False  # the native kernel reads the checkpoint layout
            self.panels = native.pack_experts(self.w13.detach(), self.w2.detach())
        elif packing_available(self.w13[0]):
            self.packed13 = [pack_weight(w) for w in self.w13]
            self.packed2 = [pack_weight(w) for w in self.w2]
        else:
            return False
        if release:
            self.w13, self.w2 = released(self.w13), released(self.w2)
        return True

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in the checkpoint layout, rebuilt from the panels when only those are held."""
        if self.w13.numel() == 0 and self.panels is not None:
            return native.unpack_experts(*self.panels)
        return self.w13, self.w2

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
        if self.panels is not None and native.kernels_supported(x):
            return native.moe_experts(x, topk_ids, topk_weights, *self.panels, expert_ids)
        if self.packed13 is None and native.kernels_supported(x):
            return native.moe_experts(x, topk_ids, topk_weights, self.w13, self.w2, expert_ids)
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()  # [T*k] expert of each (token, choice)
        order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        token_of = order // k  # [T*k] token of each grouped assignment
        weight_of = topk_weights.flatten()[order]  # [T*k]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # one host sync
        w13, w2 = self.stacked_weights() if self.packed13 is None else (None, None)
        if expert_ids is None and self.packed13 is None and self._stack_pays(counts):
            return self._stacked_forward(x, flat_ids[order], token_of, weight_of, counts, w13, w2)
        wanted = range(self.num_experts) if expert_ids is None else {int(e) for e in expert_ids}
        gathered = x[token_of]  # [T*k, H] each expert's rows contiguous
        outputs, rows_done = [], []
        start = 0
        for expert, count in enumerate(counts):  # a loop over experts, never over tokens
            rows = slice(start, start + count)
            start += count
            if count == 0 or expert not in wanted:
                continue
            outputs.append(self.expert_forward(expert, gathered[rows], w13, w2))  # [n, H]
            rows_done.append(rows)
        out = torch.zeros_like(x)
        if not outputs:
            return out
        if sum(r.stop - r.start for r in rows_done) < token_of.shape[0]:  # some experts were not wanted
            index = torch.cat([torch.arange(r.start, r.stop, device=x.device) for r in rows_done])
            token_of, weight_of = token_of[index], weight_of[index]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [rows done, H] in grouped order
        out.index_add_(0, token_of, (y * weight_of[:, None]).to(out.dtype))
        return out

    def _stack_pays(self, counts: list[int]) -> bool:
        """Use one batched matmul over all experts when every expert has work and padding stays small.

        Small per-expert batches (decode steps) run far below the memory
        bandwidth as separate matmuls; stacked into one `bmm` they stream the
        weights much better. Rows are padded to the busiest expert's count,
        so a skewed routing falls back to the per-expert loop.
        """
        busiest = max(counts)
        return min(counts) > 0 and busiest * self.num_experts <= 2 * sum(counts) and busiest <= 64

    def _stacked_forward(
        self,
        x: torch.Tensor,
        expert_of: torch.Tensor,
        token_of: torch.Tensor,
        weight_of: torch.Tensor,
        counts: list[int],
        w13: torch.Tensor,
        w2: torch.Tensor,
    ) -> torch.Tensor:
        """The same sum as the loop, with each expert's rows padded to C and run as [E, C, H] bmm calls."""
        E, C, H = self.num_experts, max(counts), x.shape[1]
        starts = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)  # [E] first grouped row of each expert
        rank = torch.arange(expert_of.shape[0], device=x.device) - starts[expert_of]  # row within its expert
        dest = expert_of * C + rank  # [T*k] row of the padded stack
        stacked = x.new_zeros(E * C, H)
        stacked[dest] = x[token_of]
        gate, up = torch.bmm(stacked.view(E, C, H), w13.transpose(1, 2)).chunk(2, dim=-1)  # 2 x [E, C, I]
        y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2)).view(E * C, H)  # [E*C, H]
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, (y[dest] * weight_of[:, None]).to(out.dtype))
        return out

    def expert_forward(
        self, expert: int, x: torch.Tensor, w13: torch.Tensor | None = None, w2: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One expert's SwiGLU MLP: x [n, H] -> [n, H] (w13, w2: `stacked_weights()`, when the caller holds them)."""
        if self.packed13 is not None:
            gate, up = packed_linear(x, self.packed13[expert], 2 * self.intermediate_size).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, self.packed2[expert], self.hidden_size)
        if w13 is None or w2 is None:
            w13, w2 = self.stacked_weights()
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)  # 2 x [n, I]
        return F.linear(F.silu(gate) * up, w2[expert])


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
