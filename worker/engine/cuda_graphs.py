"""Decode steps replayed as CUDA graphs: captured once at start-up for bucketed batch sizes.

A decode step launches a few hundred small kernels; at small batches the
GPU waits on the CPU launching them. A CUDA graph records one step's
launches once and replays them with one call. The graph reads its inputs
from static buffers (token ids, positions, cache slots, block tables,
sequence lengths), so a step copies its inputs there and replays the graph
of the smallest bucket that holds its batch; the rows past the batch are
padding that writes its keys and values to a scratch block no sequence owns
and attends to that block alone, and its logits are ignored.

Only a model whose every operation is graph-safe on its backend (no host
sync, every size on the device: the Triton backends and the plain PyTorch
matmuls, norms and router) is captured; others run eagerly. So do the steps
of a model one of whose Triton kernels could not run on the device (the
PyTorch path that then serves it may not be graph-safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moemesh.worker.models.batch import AttentionGroup, ForwardBatch, SequenceChunk
from moemesh.worker.ops.gpu import failures

log = logging.getLogger(__name__)


def graph_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every 8 up to `max_num_seqs` (and it)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def is_decode_step(chunks: Sequence[SequenceChunk]) -> bool:
    """A step of one new token per sequence, each wanting its logits: the steps the graphs serve."""
    return all(len(chunk.token_ids) == 1 and chunk.want_logits for chunk in chunks)


@dataclass
class StaticInputs:
    """The device buffers a captured step reads: one row per sequence slot of the largest bucket."""

    input_ids: torch.Tensor  # [M]
    positions: torch.Tensor  # [M]
    slots: torch.Tensor  # [M]
    block_tables: torch.Tensor  # [M, max_blocks]
    seq_lens: torch.Tensor  # [M]

    @classmethod
    def allocate(cls, rows: int, max_blocks: int, device: torch.device) -> StaticInputs:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(zeros(rows), zeros(rows), zeros(rows), zeros(rows, max_blocks), zeros(rows))


class DecodeGraphs:
    """Captures a model's decode step for each bucket size, and replays the one a step fits."""

    def __init__(self, model: torch.nn.Module, cache, block_size: int, max_num_seqs: int, max_model_len: int,
                 scratch_block: int) -> None:
        self.model, self.cache, self.block_size = model, cache, block_size
        self.buckets = graph_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_block = scratch_block  # a cache block no sequence owns: the padding rows' keys go there
        self.device = cache.k[0].device
        self.windows = model.layer_windows
        self.inputs = StaticInputs.allocate(self.buckets[-1], self.max_blocks, self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self.memory_bytes = 0
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def serves(self, chunks: Sequence[SequenceChunk]) -> bool:
        """Whether a step of `chunks` can replay a graph: a decode step of a captured size and context."""
        return (bool(self.graphs) and len(chunks) <= self.max_batch and is_decode_step(chunks)
                and all(len(chunk.block_table) <= self.max_blocks for chunk in chunks))

    def bucket(self, rows: int) -> int:
        """The smallest captured batch size that holds `rows` sequences."""
        return next(size for size in self.buckets if size >= rows)

    def batch(self, rows: int, chunks: Sequence[SequenceChunk] = ()) -> ForwardBatch:
        """The forward batch over the first `rows` static rows (every row's logits).

        The host-side fields (key count, query positions) describe `chunks` for the paths that read them when
        run eagerly; a captured graph reads only the device buffers.
        """
        inputs = self.inputs
        seq_ends = [chunk.start + 1 for chunk in chunks] + [1] * (rows - len(chunks))
        group = AttentionGroup(0, rows, rows, 1, inputs.block_tables[:rows], max(seq_ends), inputs.seq_lens[:rows],
                               [end - 1 for end in seq_ends], tuple(set(self.windows)))
        return ForwardBatch(inputs.input_ids[:rows], inputs.positions[:rows], inputs.slots[:rows], [group],
                            list(self.windows), None, [slice(i, i + 1) for i in range(rows)])

    def fill(self, chunks: Sequence[SequenceChunk], rows: int) -> None:
        """Copy a decode step's inputs into the static buffers; rows past them attend to the scratch block only."""
        n, bs = len(chunks), self.block_size
        ids = [chunk.token_ids[0] for chunk in chunks] + [0] * (rows - n)
        positions = [chunk.start for chunk in chunks] + [0] * (rows - n)
        slots = [chunk.block_table[p // bs] * bs + p % bs for chunk, p in zip(chunks, positions)]
        slots += [self.scratch_block * bs] * (rows - n)
        tables = torch.full((rows, self.max_blocks), self.scratch_block, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            tables[row, : len(chunk.block_table)] = torch.as_tensor(chunk.block_table, dtype=torch.long)
        host = torch.tensor([ids, positions, slots, [p + 1 for p in positions]], dtype=torch.long)  # one copy up
        inputs = self.inputs
        rows_on_device = host.to(self.device, non_blocking=True)
        inputs.input_ids[:rows].copy_(rows_on_device[0])
        inputs.positions[:rows].copy_(rows_on_device[1])
        inputs.slots[:rows].copy_(rows_on_device[2])
        inputs.seq_lens[:rows].copy_(rows_on_device[3])
        inputs.block_tables[:rows].copy_(tables.to(self.device, non_blocking=True))

    def capture(self) -> None:
        """Record one graph per bucket, largest first (the smaller ones reuse its memory pool); report the memory."""
        started, before = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        pool = None
        for rows in reversed(self.buckets):
            self.fill([], rows)  # all padding: the warm-up and the capture touch the scratch block only
            batch = self.batch(rows)
            with torch.inference_mode():
                self.model(batch, self.cache)  # warm-up: compiles kernels and settles allocations, outside the graph
                torch.cuda.synchronize(self.device)
                if failures():  # a kernel fell back to PyTorch, whose path may not be graph-safe: no graphs
                    log.warning("a Triton kernel could not run on this device (%s); decode steps run without CUDA "
                                "graphs", ", ".join(failures()))
                    self.graphs.clear()
                    return
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model(batch, self.cache)  # [rows, V]
            pool = graph.pool()
            self.graphs[rows] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - before
        log.info("captured %d CUDA graphs of decode steps (batch sizes %s) in %.1f s, using %.0f MiB",
                 len(self.graphs), self.buckets, time.perf_counter() - started, self.memory_bytes / 2**20)

    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Replay the step of `chunks` (after `serves`): logits [len(chunks), V], valid until the next replay."""
        rows = self.bucket(len(chunks))
        self.fill(chunks, rows)
        graph, logits = self.graphs[rows]
        graph.replay()
        self.replays += 1
        return logits[: len(chunks)]
