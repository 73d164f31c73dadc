"""A contiguous key/value cache: one fixed-length row ("slot") per running sequence.

Each layer holds keys and values as `[num_slots, max_len, n_kv, D]`; a
sequence owns one slot and its token at position p lives at row p. Simple and
exact, at the price of reserving `max_len` positions for every slot (a paged
cache replaces it later).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Per-layer K and V tensors indexed by (slot, position)."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, max_len, num_kv_heads, head_dim)
        self.num_slots = num_slots
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        """Number of layers the cache holds."""
        return len(self.k)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values: slots [B], positions [B, T], k and v [B, T, n_kv, D]."""
        rows = slots[:, None].expand_as(positions)  # [B, T]
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of each slot: 2 x [B, length, n_kv, D]."""
        return self.k[layer][slots, :length], self.v[layer][slots, :length]
