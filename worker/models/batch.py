"""One forward call's input: the new tokens of many sequences, flattened, and how they attend.

The engine describes each sequence's share of a step as a `SequenceChunk`
(its new tokens, where they start, its block table); `ForwardBatch.build`
lays every new token out on one flat axis of N rows, so that projections,
norms and experts run as single [N, H] matmuls whatever mix of prompt chunks
and decodes the step holds. Attention needs each sequence's own keys, so
chunks of the same length are stacked into attention groups of shape
[B, T]; a step of pure decodes is one group with T = 1.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceChunk:
    """The new tokens of one sequence in one forward call."""

    token_ids: Sequence[int]
    start: int  # position of the first new token; earlier positions are in the cache already
    block_table: Sequence[int]  # blocks covering positions [0, start + len(token_ids))
    want_logits: bool = True  # logits of the last new token are needed (False: a prompt chunk that is not the last)
    every_logits: bool = False  # logits of every new token are needed (scoring a prompt), the last one last


@dataclass
class AttentionGroup:
    """Sequences whose new tokens have the same count T: flat rows [start, stop) viewed as [B, T]."""

    start: int
    stop: int
    num_seqs: int
    num_tokens: int
    block_tables: torch.Tensor  # [B, nb] padded with block 0 (masked out)
    kv_len: int  # key positions [0, kv_len) are attended to (the furthest query's position + 1)
    seq_lens: torch.Tensor  # [B] each sequence's key count (its last query's position + 1)
    query_positions: Sequence[int]  # [B * T] each row's position
    windows: Sequence[int | None]  # the sliding windows the layers use (None: full attention)

    @functools.cached_property
    def masks(self) -> dict[int | None, torch.Tensor]:
        """By sliding window: [B, 1, T, kv_len], True where a query sees a key.

        Built on first use: decode steps that attend in the native kernel never need them.
        """
        device = self.block_tables.device
        query_pos = torch.tensor(self.query_positions, dtype=torch.long, device=device)
        query_pos = query_pos.view(self.num_seqs, self.num_tokens, 1)  # [B, T, 1]
        key_pos = torch.arange(self.kv_len, device=device)  # [L]
        causal = key_pos <= query_pos  # [B, T, L]
        masks = {}
        for window in self.windows:
            mask = causal if window is None else causal & (key_pos > query_pos - window)
            masks[window] = mask.unsqueeze(1)  # [B, 1, T, L]
        return masks


@dataclass
class ForwardBatch:
    """Flat token rows of one forward, with their cache slots and attention groups."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot (block * block_size + offset) each token's K/V is written to
    groups: list[AttentionGroup]
    layer_windows: Sequence[int | None]  # sliding window of each layer (None: full attention)
    logits_indices: torch.Tensor | None  # [S] rows whose logits are wanted, in chunk order; None = every row
    chunk_rows: list[slice]  # rows of each chunk, in the order the chunks were given

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        block_size: int,
        layer_windows: Sequence[int | None],
        device: torch.device | str = "cpu",
        all_logits: bool = False,
    ) -> ForwardBatch:
        """Lay out `chunks` (each non-empty); with `all_logits`, every row's logits are returned."""
        by_length: dict[int, list[int]] = {}
        for index, chunk in enumerate(chunks):
            if not chunk.token_ids:
                raise ValueError("a chunk needs at least one token")
            end = chunk.start + len(chunk.token_ids)
            if len(chunk.block_table) * block_size < end:
                raise ValueError(
                    f"block table covers {len(chunk.block_table) * block_size} positions; position {end - 1} needs more"
                )
            by_length.setdefault(len(chunk.token_ids), []).append(index)

        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[slice] = [slice(0)] * len(chunks)
        group_specs = []
        for length in sorted(by_length):  # decodes (T = 1) first
            members = by_length[length]
            start = len(ids)
            for index in members:
                chunk = chunks[index]
                rows[index] = slice(len(ids), len(ids) + length)
                ids.extend(chunk.token_ids)
                for pos in range(chunk.start, chunk.start + length):
                    positions.append(pos)
                    slots.append(chunk.block_table[pos // block_size] * block_size + pos % block_size)
            group_specs.append((start, len(ids), members, length))

        def tensor(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        windows = tuple(set(layer_windows))
        groups = []
        for start, stop, members, length in group_specs:
            kv_len = max(chunks[i].start for i in members) + length
            num_blocks = -(-kv_len // block_size)
            tables = [list(chunks[i].block_table[:num_blocks]) for i in members]
            tables = tensor([t + [0] * (num_blocks - len(t)) for t in tables])  # [B, nb]
            seq_lens = tensor([chunks[i].start + length for i in members])  # [B]
            groups.append(AttentionGroup(start, stop, len(members), length, tables, kv_len, seq_lens,
                                         positions[start:stop], windows))

        if all_logits:
            logits_indices = None
        else:
            indices = []
            for i, c in enumerate(chunks):
                if c.every_logits:
                    indices.extend(range(rows[i].start, rows[i].stop))
                elif c.want_logits:
                    indices.append(rows[i].stop - 1)
            logits_indices = tensor(indices)
        input_ids, input_positions, input_slots = tensor([ids, positions, slots])  # one tensor, three row views
        return cls(input_ids, input_positions, input_slots, groups, list(layer_windows), logits_indices, rows)
