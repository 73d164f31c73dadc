"""A fused MoE layer in two Triton kernels over expert-sorted tokens: gate+up with SwiGLU, then down with the weights.

The router's T*k (token, choice) assignments are sorted by expert and each
expert's run is padded to a multiple of the row block `BLOCK_M`, so that
every block of sorted rows belongs to one expert (`align`). Then:

1. `_gate_up_kernel`: one grouped GEMM launch; each program multiplies a
   block of sorted rows (gathered from x by token) by one block of columns
   of its expert's gate rows and the same columns of its up rows, and
   stores silu(gate) * up: the intermediate activations [rows, I];
2. `_down_kernel`: one launch; each program multiplies a block of those rows
   by its expert's down projection and scales each row by its routing
   weight, writing row (token, choice) of a [T*k, H] float32 result.

The sum over a token's k choices is one reduction of that result: a token's
choices lie in different experts' blocks, and summing them with atomics
would make the result depend on the order the blocks run in, so a request's
output would depend on what else is in the batch.

Everything stays on the device (no host sync: sizes are bounded by T, k, E
and the block size), so a decode step that uses it can be captured in a
CUDA graph. Block sizes come from `moe_config` (a heuristic, or what
`tune` measured for the device and shape, cached under the cache directory).
With `expert_ids`, only those experts' rows are computed (expert
parallelism: partial outputs over a partition of the experts sum to the
whole).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from moemesh.worker.ops.gpu import launch

FUSED_MOE = "fused MoE"  # the kernels' name in failure reports


@dataclass(frozen=True)
class MoEConfig:
    """Block sizes of the two kernels: rows per block, columns per program, reduction step."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class Alignment:
    """Sorted, padded assignment rows and the expert of each block of `block_m` of them (all on the device)."""

    sorted_rows: torch.Tensor  # [P] assignment index (token * k + choice) of each padded row; T*k where padding
    block_expert: torch.Tensor  # [P / block_m] the expert of each block; E for blocks past the last expert's
    num_padded: torch.Tensor  # [1] rows in use (the padded total of every computed expert's run)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_ids: Iterable[int] | None = None) -> Alignment:
    """Sort topk_ids [T, k]'s assignments by expert, each expert's run padded to a multiple of `block_m`; an id
    of -1 (a choice not taken, as expert parallelism hands a rank rows with fewer than k) is never computed."""
    flat = topk_ids.flatten()  # [T*k]
    n, device = flat.numel(), flat.device
    flat = torch.where(flat < 0, num_experts, flat)  # untaken choices: the sentinel expert E, never computed
    if expert_ids is not None:  # other experts' assignments go to the sentinel too
        wanted = torch.zeros(num_experts + 1, dtype=torch.bool, device=device)
        wanted[torch.tensor(sorted(set(int(e) for e in expert_ids)), dtype=torch.long, device=device)] = True
        flat = torch.where(wanted[flat], flat, num_experts)
    # Counted with a scatter into a fixed-size tensor: bincount sizes its output from the data, a host sync.
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E] end of each expert's padded run
    capacity = n + num_experts * (block_m - 1)
    capacity = (capacity + block_m - 1) // block_m * block_m  # static: no host sync
    order = flat.argsort(stable=True)  # [T*k] assignments grouped by expert (sentinel last)
    expert_of = flat[order]
    computed = expert_of < num_experts
    first_of_expert = torch.cumsum(counts, 0) - counts  # [E] first grouped assignment of each expert
    safe = expert_of.clamp(max=num_experts - 1)
    rank = torch.arange(n, device=device) - first_of_expert[safe]  # position within its expert's run
    dest = torch.where(computed, ends[safe] - padded[safe] + rank, capacity)  # padded row, or dropped
    sorted_rows = torch.full((capacity + 1,), n, dtype=torch.int32, device=device)
    sorted_rows[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)  # E past the last run
    return Alignment(sorted_rows[:capacity], block_expert, ends[-1:].to(torch.int32))


@triton.jit
def _row_block(sorted_rows_ptr, block_expert_ptr, num_padded_ptr, num_assignments, num_experts,
               BLOCK_M: tl.constexpr):
    """This program's block of sorted rows: whether it has work, its expert, the rows [BM], their assignments, and
    which of them are real (not padding)."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    active = (pid_m * BLOCK_M < tl.load(num_padded_ptr)) & (expert < num_experts)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_rows_ptr + rows)
    return active, expert, rows, assignment, assignment < num_assignments


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, out_ptr, sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    num_assignments, top_k, hidden, inter, num_experts,
    stride_xt, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[r, n] = silu(x[token(r)] . w13[e, n]) * (x[token(r)] . w13[e, inter + n]) for a block of rows and columns."""
    active, expert, rows, assignment, valid = _row_block(sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
                                                         num_assignments, num_experts, BLOCK_M)
    if not active:
        return
    token = assignment // top_k
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate columns
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    w_expert = w13_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + ks) < hidden
        x = tl.load(x_ptr + token[:, None] * stride_xt + (k0 + ks)[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        w_gate = tl.load(w_expert + cols[None, :] * stride_wn + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)  # [BK, BN]
        w_up = tl.load(w_expert + (inter + cols)[None, :] * stride_wn + (k0 + ks)[:, None],
                       mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies 16-bit floats wrongly; compiled kernels take them as they are
            x, w_gate, w_up = x.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
        gate += tl.dot(x, w_gate, input_precision=PRECISION)
        up += tl.dot(x, w_up, input_precision=PRECISION)
    act = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up, in float32
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], act.to(out_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w2_ptr, weights_ptr, out_ptr, sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    num_assignments, hidden, inter, num_experts,
    stride_am, stride_we, stride_wn, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[assignment(r), n] = weight(r) * (act[r] . w2[e, n]) for a block of rows and output columns (float32)."""
    active, expert, rows, assignment, valid = _row_block(sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
                                                         num_assignments, num_experts, BLOCK_M)
    if not active:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    w_expert = w2_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = (k0 + ks) < inter
        a = tl.load(act_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK]
        w = tl.load(w_expert + cols[None, :] * stride_wn + (k0 + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # [BK, BN]
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=PRECISION)
    weight = tl.load(weights_ptr + assignment, mask=valid, other=0.0)  # [BM] routing weights, float32
    tl.store(out_ptr + assignment[:, None] * stride_ot + cols[None, :], acc * weight[:, None],
             mask=valid[:, None] & col_ok[None, :])


# Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was
# imported): it multiplies 16-bit floats wrongly, so their dots take float32 operands there.
INTERPRETED = isinstance(_gate_up_kernel, InterpretedFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models multiply in full float32 ("ieee"), as PyTorch does by default; TF32 would cost their parity."""
    return "ieee" if dtype == torch.float32 else "tf32"


def fused_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_ids: Iterable[int] | None = None,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Each token's routing-weighted sum of its experts' SwiGLU: x [T, H] -> [T, H] (w13 [E, 2I, H], w2 [E, H, I])."""
    T, H = x.shape
    E, two_inter, _ = w13.shape
    inter, k = two_inter // 2, topk_ids.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    tuning = config is not None  # a configuration on trial: its failures are the tuner's to handle
    config = config or moe_config(T * k, E, H, inter, x.device)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    aligned = align(topk_ids, E, config.block_m, expert_ids)
    capacity = aligned.sorted_rows.numel()
    act = torch.empty(capacity, inter, dtype=x.dtype, device=x.device)  # [P, I]
    out = torch.zeros(T * k, H, dtype=torch.float32, device=x.device)  # [T*k, H]; rows not computed stay zero
    blocks = capacity // config.block_m
    common = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, UPCAST=INTERPRETED,
                  PRECISION=dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages)
    def run() -> None:
        _gate_up_kernel[(blocks, triton.cdiv(inter, config.block_n))](
            x, w13, act, aligned.sorted_rows, aligned.block_expert, aligned.num_padded,
            T * k, k, H, inter, E, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), **common)
        _down_kernel[(blocks, triton.cdiv(H, config.block_n))](
            act, w2, topk_weights.float().contiguous().flatten(), out, aligned.sorted_rows, aligned.block_expert,
            aligned.num_padded, T * k, H, inter, E, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0), **common)

    if tuning:
        run()
    else:
        launch(FUSED_MOE, run)
    return out.view(T, k, H).sum(dim=1).to(x.dtype)  # the sum over a token's choices, in a fixed order


# ---- block sizes ------------------------------------------------------------------------------------------------

TUNED_FILE = "moe_configs.json"


@functools.lru_cache(maxsize=1024)  # asked every layer of every step: one lookup, not a file read and a device query
def moe_config(assignments: int, num_experts: int, hidden: int, inter: int, device: torch.device) -> MoEConfig:
    """Block sizes for this shape: what `tune` measured on this kind of device, else a heuristic."""
    tuned = _tuned_configs(_device_name(device)).get(_shape_key(assignments, num_experts, hidden, inter))
    return MoEConfig(**tuned) if tuned else heuristic_config(assignments, num_experts)


def heuristic_config(assignments: int, num_experts: int) -> MoEConfig:
    """Rows per block near the rows each expert gets (decode steps: few), wider blocks for prefill-sized batches."""
    per_expert = assignments / max(num_experts, 1)
    if per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if per_expert <= 64:
        return MoEConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return MoEConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


# What `tune` tries: 12 configs, each compiled once per device (about a second each).
CANDIDATES = [MoEConfig(m, n, k, 4 if m < 64 else 8, 3) for m in (16, 32, 64) for n in (64, 128) for k in (64, 128)]


def tune(num_tokens: int, top_k: int, w13: torch.Tensor, w2: torch.Tensor) -> MoEConfig:
    """Measure every candidate block size on this device for a batch of `num_tokens` and keep the fastest (cached)."""
    E, two_inter, H = w13.shape
    x = torch.randn(num_tokens, H, dtype=w13.dtype, device=w13.device)
    ids = torch.stack([torch.randperm(E, device=w13.device)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, device=w13.device)
    timings = {}
    for config in CANDIDATES:
        try:
            timings[config] = triton.testing.do_bench(lambda c=config: fused_experts(x, ids, weights, w13, w2, config=c))
        except triton.runtime.errors.OutOfResources:  # too much shared memory for this device
            continue
    best = min(timings, key=timings.get)
    _store_tuned(_device_name(w13.device), _shape_key(num_tokens * top_k, E, H, two_inter // 2), best)
    return best


def _shape_key(assignments: int, num_experts: int, hidden: int, inter: int) -> str:
    # Assignments bucketed by powers of two: a config measured for 96 rows serves 65..128.
    bucket = 1 << max(0, (assignments - 1).bit_length())
    return f"E={num_experts},H={hidden},I={inter},M={bucket}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _tuned_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOEMESH_CACHE_DIR", pathlib.Path.home() / ".cache" / "moemesh")) / "triton" / TUNED_FILE


@functools.cache
def _tuned_configs(device_name: str) -> dict[str, dict]:
    path = _tuned_path()
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get(device_name, {})


def _store_tuned(device_name: str, key: str, config: MoEConfig) -> None:
    path = _tuned_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.setdefault(device_name, {})[key] = asdict(config)
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    forget_tuned()


def forget_tuned() -> None:
    """Read the tuned table afresh on the next lookup (after `tune` stored one, or the cache directory moved)."""
    _tuned_configs.cache_clear()
    moe_config.cache_clear()
