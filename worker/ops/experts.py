"""Routed SwiGLU experts, each token's weighted sum of its chosen experts, on the backend chosen once at load.

The weights come in the checkpoint layout: w13 [E, 2I, H] (each expert's
gate rows, then its up rows) and w2 [E, H, I] (the down projection).
`choose_experts` builds the first entry of `EXPERTS_BACKENDS` that serves the
target:
  - `NativeExperts` (float32 on the CPU, with the native kernels): the whole
    layer in one native call, straight from the router's choices, on panels
    (`native.pack_experts`, with re-layout and sizes the panels hold) or on
    the checkpoint layout, which the kernel also reads;
  - `OneDNNExperts` (CPU, with re-layout): each expert's matrices packed for
    oneDNN, one expert at a time on its rows;
  - `TritonExperts` (CUDA, with Triton, unless MOEMESH_TRITON_KERNELS=0): the
    fused MoE kernel over expert-sorted tokens (`ops/gpu/moe.py`);
  - `TorchExperts` (any device; the reference): one batched matmul over all
    experts when that pays, else one expert at a time.

Every backend takes `expert_ids`: only those experts are computed and the
others contribute nothing, so that partial outputs over a partition of the
experts sum to the whole output. Expert parallelism builds on that:
`ops.remote.RemoteExperts` sends each shard the rows routed to its experts,
runs rank 0's own on the backend chosen here for them, and sums. It is not an
entry of the table: the placement, not the target, decides where an expert
runs, so a module whose layer has experts on other ranks wraps its local
backend in it (`MoEExperts.remote`).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from moemesh.worker.ops import native
from moemesh.worker.ops.backends import Backend, Target, first_serving
from moemesh.worker.ops.gpu import attempt, triton_kernels
from moemesh.worker.ops.packing import pack_weight, packed_linear


class ExpertsBackend(Backend):
    """x [T, H], topk_ids [T, k], topk_weights [T, k] -> the weighted sum of each token's experts [T, H].

    An id of -1 is a choice not taken, whatever its weight: expert parallelism hands a rank rows with fewer
    choices than k, and every backend takes them in one call."""

    panels: tuple[torch.Tensor, torch.Tensor] | None = None  # the native kernel's panel layout, when held
    packed13: list[torch.Tensor] | None = None  # each expert's w13 packed for oneDNN, when held
    reads_plain_weights = True  # False: nothing here reads w13 and w2, so their module may release them
    relaid = False  # the weights were laid out anew for this backend

    @classmethod
    @abstractmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, target: Target) -> ExpertsBackend:
        """This backend on the checkpoint layout's w13 [E, 2I, H] and w2 [E, H, I]."""

    @abstractmethod
    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """x [T, H] -> [T, H]; with `expert_ids`, only those experts contribute."""


class NativeExperts(ExpertsBackend):
    """The whole layer in one native call (float32 CPU), on panels or on the checkpoint layout.

    The panels measured 1.08x faster than the checkpoint layout in a decode
    step and 1.15x at prefill, and 1.7x and 1.08x faster than oneDNN
    (bench/native_bench.py); experts whose sizes the panels cannot hold keep
    the checkpoint layout.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        self.w13, self.w2 = w13, w2  # panels p13 [E, I/16, H, 32], p2 [E, H/32, I, 32], or the checkpoint layout
        on_panels = w13.dim() == 4
        self.panels = (w13, w2) if on_panels else None
        self.reads_plain_weights, self.relaid = not on_panels, on_panels

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.native

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, target: Target) -> NativeExperts:
        hidden_size, intermediate_size = w2.shape[1], w2.shape[2]
        if target.relayout and native.experts_packable(hidden_size, intermediate_size):
            return cls(*native.pack_experts(w13.detach(), w2.detach()))
        return cls(w13, w2)

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        return native.moe_experts(x, topk_ids, topk_weights, self.w13, self.w2, expert_ids)


@dataclass
class Grouping:
    """The router's T*k (token, choice) assignments sorted by expert: each expert's rows are contiguous."""

    flat_ids: torch.Tensor  # [T*k] expert of each (token, choice)
    order: torch.Tensor  # [T*k] the assignments grouped by expert (a stable sort)
    token_of: torch.Tensor  # [T*k] token of each grouped assignment
    weight_of: torch.Tensor  # [T*k] routing weight of each grouped assignment
    counts: list[int]  # [E] assignments of each expert

    @classmethod
    def of(cls, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> Grouping:
        """Group topk_ids [T, k] and topk_weights [T, k] by expert; an id of -1 (a choice not taken) is left out."""
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()
        untaken, *counts = torch.bincount(flat_ids + 1, minlength=num_experts + 1).tolist()  # one host sync
        order = flat_ids.argsort(stable=True)[untaken:]  # the untaken (-1) sort first
        token_of, weight_of = order // k, topk_weights.flatten()[order]
        return cls(flat_ids, order, token_of, weight_of, counts)

    def expert_rows(self) -> list[slice]:
        """[E] the grouped rows of each expert."""
        ends = list(itertools.accumulate(self.counts))
        return [slice(end - count, end) for end, count in zip(ends, self.counts)]


class GroupedExperts(ExpertsBackend):
    """Experts run one at a time on their own rows, a loop over experts (never over tokens): the library paths."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    @abstractmethod
    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU MLP: x [n, H] -> [n, H]."""

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        return self.looped(x, Grouping.of(topk_ids, topk_weights, self.num_experts), expert_ids)

    def looped(self, x: torch.Tensor, grouping: Grouping, expert_ids: Iterable[int] | None) -> torch.Tensor:
        """Each wanted expert on its rows, the outputs weighted and summed per token: x [T, H] -> [T, H]."""
        wanted = range(self.num_experts) if expert_ids is None else {int(e) for e in expert_ids}
        gathered = x[grouping.token_of]  # [T*k, H] each expert's rows contiguous
        outputs, rows_done = [], []
        for expert, rows in enumerate(grouping.expert_rows()):
            if rows.stop > rows.start and expert in wanted:
                outputs.append(self.expert_forward(expert, gathered[rows]))  # [n, H]
                rows_done.append(rows)
        return self.combine(x, grouping, outputs, rows_done)

    @staticmethod
    def combine(
        x: torch.Tensor, grouping: Grouping, outputs: list[torch.Tensor], rows_done: list[slice]
    ) -> torch.Tensor:
        """Sum the experts' outputs [n, H] (for grouped rows `rows_done`) into their tokens, weighted: [T, H]."""
        out = torch.zeros_like(x)
        if not outputs:
            return out
        token_of, weight_of = grouping.token_of, grouping.weight_of
        if sum(r.stop - r.start for r in rows_done) < token_of.shape[0]:  # some experts were not wanted
            index = torch.cat([torch.arange(r.start, r.stop, device=x.device) for r in rows_done])
            token_of, weight_of = token_of[index], weight_of[index]
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [rows done, H] in grouped order
        out.index_add_(0, token_of, (y * weight_of[:, None]).to(out.dtype))
        return out


class OneDNNExperts(GroupedExperts):
    """Each expert's matrices packed once for oneDNN (CPU); at 8 rows per expert its SwiGLU runs about 1.5x faster
    than the batched `bmm` and 2x faster than `F.linear` on the 2-core bench machine (see `packing`)."""

    reads_plain_weights = False
    relaid = True

    def __init__(
        self, packed13: list[torch.Tensor], packed2: list[torch.Tensor], hidden_size: int, intermediate_size: int
    ) -> None:
        super().__init__(len(packed13))
        self.packed13, self.packed2 = packed13, packed2
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.onednn

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, target: Target) -> OneDNNExperts:
        return cls([pack_weight(w) for w in w13], [pack_weight(w) for w in w2], w2.shape[1], w2.shape[2])

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed_linear(x, self.packed13[expert], 2 * self.intermediate_size).chunk(2, dim=-1)  # 2 x [n, I]
        return packed_linear(F.silu(gate) * up, self.packed2[expert], self.hidden_size)


class TorchExperts(GroupedExperts):
    """The stacked weights with PyTorch matmuls: any device and dtype; the reference, and the CUDA path."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__(w13.shape[0])
        self.w13, self.w2 = w13, w2

    @classmethod
    def serves(cls, target: Target) -> bool:
        return True

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, target: Target) -> TorchExperts:
        return cls(w13, w2)

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        grouping = Grouping.of(topk_ids, topk_weights, self.num_experts)
        if expert_ids is None and self.stack_pays(grouping.counts):
            return self.stacked(x, grouping)
        return self.looped(x, grouping, expert_ids)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[expert]).chunk(2, dim=-1)  # 2 x [n, I]
        return F.linear(F.silu(gate) * up, self.w2[expert])

    def stack_pays(self, counts: list[int]) -> bool:
        """Use one batched matmul over all experts when every expert has work and padding stays small.

        Small per-expert batches (decode steps) run far below the memory
        bandwidth as separate matmuls; stacked into one `bmm` they stream the
        weights much better. Rows are padded to the busiest expert's count,
        so a skewed routing falls back to the per-expert loop.
        """
        busiest = max(counts)
        return min(counts) > 0 and busiest * self.num_experts <= 2 * sum(counts) and busiest <= 64

    def stacked(self, x: torch.Tensor, grouping: Grouping) -> torch.Tensor:
        """The same sum as the loop, with each expert's rows padded to C and run as [E, C, H] bmm calls."""
        counts, token_of = grouping.counts, grouping.token_of
        E, C, H = self.num_experts, max(counts), x.shape[1]
        expert_of = grouping.flat_ids[grouping.order]  # [T*k] expert of each grouped assignment
        starts = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)  # [E] first grouped row of each expert
        rank = torch.arange(expert_of.shape[0], device=x.device) - starts[expert_of]  # row within its expert
        dest = expert_of * C + rank  # [T*k] row of the padded stack
        stacked = x.new_zeros(E * C, H)
        stacked[dest] = x[token_of]
        gate, up = torch.bmm(stacked.view(E, C, H), self.w13.transpose(1, 2)).chunk(2, dim=-1)  # 2 x [E, C, I]
        y = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2)).view(E * C, H)  # [E*C, H]
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, (y[dest] * grouping.weight_of[:, None]).to(out.dtype))
        return out


# In order of preference: `choose_experts` builds the first entry that serves the target.
class TritonExperts(TorchExperts):
    """The fused MoE kernel (`ops/gpu/moe.py`): tokens sorted by expert, one grouped GEMM launch for gate+up with
    SwiGLU and one for down with the routing weights; CUDA, with Triton; no host sync, so graph-capturable.
    `TorchExperts` serves instead once the kernel failed to build or fit the device."""

    graph_safe = True

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, kernels: ModuleType | None = None) -> None:
        super().__init__(w13, w2)
        if kernels is None:  # imported here: the module compiles nothing until called, but needs Triton
            from moemesh.worker.ops.gpu import moe as kernels
        self.kernels = kernels

    @classmethod
    def serves(cls, target: Target) -> bool:
        return target.device.type == "cuda" and triton_kernels()

    @classmethod
    def build(cls, w13: torch.Tensor, w2: torch.Tensor, target: Target) -> TritonExperts:
        return cls(w13, w2)

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        out = attempt(self.kernels.FUSED_MOE,
                      lambda: self.kernels.fused_experts(x, topk_ids, topk_weights, self.w13, self.w2, expert_ids))
        return super().__call__(x, topk_ids, topk_weights, expert_ids) if out is None else out


EXPERTS_BACKENDS: tuple[type[ExpertsBackend], ...] = (NativeExperts, OneDNNExperts, TritonExperts, TorchExperts)


def choose_experts(w13: torch.Tensor, w2: torch.Tensor, target: Target) -> ExpertsBackend:
    """The experts' backend for `target`: the first of `EXPERTS_BACKENDS` that serves it."""
    return first_serving(EXPERTS_BACKENDS, target).build(w13, w2, target)
