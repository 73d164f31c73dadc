"""Sizing the KV pool from memory, and the sequence limit from the pool, as other serving systems do.

A worker started without a block count or a sequence limit sizes both: the
KV pool from a memory budget, then the sequence limit from the pool (room for
`TOKENS_PER_AUTO_SLOT` tokens a slot, at most `MAX_AUTO_SEQS` slots);
sequences that outgrow the pool are preempted and recomputed, never failed.
So a user who starts a worker with no flags serves as many concurrent
streams as its memory allows.

On the CPU the budget is `cpu_kv_cache_gib`, by default the smaller of
`DEFAULT_CPU_KV_GIB` and `CPU_KV_MEMORY_FRACTION` of the machine's memory.

A step's token budget (`max_num_batched_tokens`: prompt chunks plus one
token per decode) follows the machine too, when it is not configured: on
CUDA `DEFAULT_TOKEN_BUDGET`; on the CPU `CPU_TOKENS_PER_THREAD` per compute
thread, from `CPU_MIN_TOKEN_BUDGET` to `DEFAULT_TOKEN_BUDGET`. Every
decoding sequence waits for the step that carries a prompt chunk, and a
CPU computes about a thread's share of such a chunk per unit of time: with a
fixed 2,048 tokens, a 2-core worker spent 2 to 3.5 s on one such step (every
stream's inter-token p99 then passes a second), where 512 tokens take about
0.6 s and serve the same throughput (BENCHMARKS.md, "The token budget").

On CUDA the KV cache gets
what is left of `gpu_memory_utilization` of the device's memory once the
CUDA context, the weights (and anything else already on the device) and the
peak of one profiled engine step are counted. The profiled step is the
largest the engine schedules: a prompt chunk filling the token budget beside
one-token decodes up to the sequence limit, with logits for every sequence
and a sampling pass over them (the sort of top-p/top-k is the largest
temporary outside the model).

The pool is capped at `POOL_CAP_FACTOR` times what every sequence slot needs
at full length: past that, blocks only lengthen the prefix cache, and each
costs host-side bookkeeping (a small model on a large GPU would otherwise
get millions of blocks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from moemesh.worker.engine.sampling import SamplingBatch, SamplingParams, sample_tokens
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk

log = logging.getLogger(__name__)

GIB = 1 << 30
POOL_CAP_FACTOR = 16
# Sequence limits sized from the pool: a slot per this many tokens of it, up to this many slots.
TOKENS_PER_AUTO_SLOT = 1024
MAX_AUTO_SEQS = 256
# A step's token budget when none is configured: this on CUDA; on the CPU this many per compute thread, within
# [CPU_MIN_TOKEN_BUDGET, DEFAULT_TOKEN_BUDGET].
DEFAULT_TOKEN_BUDGET = 2048
CPU_TOKENS_PER_THREAD = 256
CPU_MIN_TOKEN_BUDGET = 512
# The CPU's KV budget when none is configured: the smaller of these.
DEFAULT_CPU_KV_GIB = 2.0
CPU_KV_MEMORY_FRACTION = 0.1


def auto_max_num_seqs(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """The sequence limit a pool of `num_blocks` supports: one slot per TOKENS_PER_AUTO_SLOT tokens (or per
    max_model_len, when shorter), between 1 and MAX_AUTO_SEQS."""
    per_slot = min(max_model_len, TOKENS_PER_AUTO_SLOT)
    return max(1, min(MAX_AUTO_SEQS, num_blocks * block_size // per_slot))


def default_token_budget(device: str, threads: int) -> int:
    """The most tokens one step computes when `max_num_batched_tokens` is not configured (see the module doc)."""
    if device.startswith("cuda"):
        return DEFAULT_TOKEN_BUDGET
    return min(max(CPU_TOKENS_PER_THREAD * threads, CPU_MIN_TOKEN_BUDGET), DEFAULT_TOKEN_BUDGET)


def cpu_kv_budget_bytes(configured_gib: float = 0.0) -> int:
    """The CPU KV pool's budget: `configured_gib`, or by default min(DEFAULT_CPU_KV_GIB, 10% of the memory)."""
    if configured_gib:
        return int(configured_gib * GIB)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(DEFAULT_CPU_KV_GIB * GIB, CPU_KV_MEMORY_FRACTION * total))


def plan_cpu_kv_pool(model: torch.nn.Module, *, block_size: int, budget_bytes: int, max_num_seqs: int,
                     max_model_len: int) -> int:
    """Blocks of the CPU KV pool: what `budget_bytes` holds, at most every one of `max_num_seqs` slots at full
    length (past that, blocks only lengthen the prefix cache); at least one full-length sequence."""
    probe = model.make_cache(num_blocks=1, block_size=block_size)
    per_seq = -(-max_model_len // block_size)
    blocks = budget_bytes // probe.bytes_per_block
    return max(per_seq, min(blocks, max_num_seqs * per_seq))


@dataclass(frozen=True)
class KVPoolPlan:
    """How the device's memory splits, and the blocks the KV pool gets."""

    num_blocks: int
    bytes_per_block: int
    total_bytes: int  # the device's memory
    utilization: float  # fraction of it the worker may fill
    in_use_bytes: int  # taken before the pool: CUDA context, weights, other processes
    step_bytes: int  # peak of one profiled engine step beyond that
    capped: bool = False  # the budget held more than POOL_CAP_FACTOR times the slots' need

    def describe(self, block_size: int) -> str:
        """One start-up line: the pool and where the rest of the memory went."""
        share = (f"capped at {POOL_CAP_FACTOR}x what every sequence slot needs at full length, within "
                 if self.capped else "= ")
        return (f"KV pool: {self.num_blocks} blocks of {block_size} tokens ({self.num_blocks * block_size} tokens, "
                f"{self.num_blocks * self.bytes_per_block / GIB:.2f} GiB) {share}{self.utilization:.2f} of "
                f"{self.total_bytes / GIB:.1f} GiB, less {self.in_use_bytes / GIB:.2f} GiB in use before it "
                f"(CUDA context, weights) and {self.step_bytes / GIB:.2f} GiB for a step's activations")


def blocks_in_budget(total_bytes: int, utilization: float, in_use_bytes: int, step_bytes: int,
                     bytes_per_block: int) -> int:
    """Blocks that fit in `utilization` of `total_bytes` beside what is in use and a step's peak.

    ValueError naming `gpu_memory_utilization` when not even one block fits.
    """
    room = int(total_bytes * utilization) - in_use_bytes - step_bytes
    if room < bytes_per_block:
        raise ValueError(
            f"gpu_memory_utilization {utilization:.2f} of {total_bytes / GIB:.1f} GiB leaves no room for the KV cache: "
            f"{in_use_bytes / GIB:.2f} GiB are in use (CUDA context, weights, other processes) and a step needs "
            f"{step_bytes / GIB:.2f} GiB; raise gpu_memory_utilization or set num_kv_blocks"
        )
    return room // bytes_per_block


def plan_gpu_kv_pool(model: torch.nn.Module, *, block_size: int, utilization: float, max_num_seqs: int,
                     max_num_batched_tokens: int, max_model_len: int) -> KVPoolPlan:
    """Measure the device and one worst-case step of `model` (on CUDA), and size the pool."""
    device = model.embed_tokens.weight.device
    probe = model.make_cache(num_blocks=1, block_size=block_size)
    bytes_per_block = probe.bytes_per_block
    del probe
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    step = profile_step_bytes(model, block_size, max_num_seqs, min(max_num_batched_tokens, max_model_len))
    blocks = blocks_in_budget(total, utilization, total - free, step, bytes_per_block)
    cap = POOL_CAP_FACTOR * max_num_seqs * -(-max_model_len // block_size)
    return KVPoolPlan(min(blocks, cap), bytes_per_block, total, utilization, total - free, step, capped=blocks > cap)


def profile_step_bytes(model: torch.nn.Module, block_size: int, max_num_seqs: int, tokens: int) -> int:
    """Peak device memory one worst-case step takes beyond what is allocated before it (bytes)."""
    device = model.embed_tokens.weight.device
    decodes = min(max_num_seqs, tokens) - 1
    prompt = tokens - decodes
    vocab = model.vocab_size
    chunks = [SequenceChunk([i % vocab for i in range(prompt)], 0, list(range(-(-prompt // block_size))))]
    first_free = len(chunks[0].block_table)
    chunks += [SequenceChunk([i % vocab], 0, [first_free + i]) for i in range(decodes)]
    cache = model.make_cache(num_blocks=first_free + decodes, block_size=block_size)
    batch = ForwardBatch.build(chunks, block_size, model.layer_windows, device)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * len(chunks)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        logits = model(batch, cache)  # [S, V]
        sample_tokens(logits, SamplingBatch.build(params, [0] * len(chunks), [0] * len(chunks), device), params)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del cache, logits
    torch.cuda.empty_cache()
    return peak
