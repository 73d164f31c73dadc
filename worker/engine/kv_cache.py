"""The paged key/value cache: per-layer block pools of keys and values, addressed by flat slots.

Keys and values live in fixed-size blocks: each layer holds
`[num_blocks, block_size, n_kv, D]` tensors. Which blocks a sequence owns,
and prefix caching, are the block manager's (`block_manager.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PagedKVCache:
    """Per-layer K and V block pools; positions are addressed as flat slots `block * block_size + offset`."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def bytes_per_block(self) -> int:
        """Memory one block takes across all layers, keys and values."""
        first = self.k[0]
        return 2 * self.num_layers * first[0].numel() * first.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values of N tokens: slots [N] flat positions, k and v [N, n_kv, D]."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of each row's blocks in order: block_tables [B, nb] -> 2 x [B, nb * block_size, n_kv, D]."""
        B, nb = block_tables.shape
        flat = block_tables.reshape(-1)
        keys = self.k[layer].index_select(0, flat)  # [B*nb, bs, n_kv, D]
        values = self.v[layer].index_select(0, flat)
        return keys.view(B, nb * self.block_size, *keys.shape[2:]), values.view(B, nb * self.block_size, *values.shape[2:])

    def copy_blocks(self, layer: int, block_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the given blocks (for export): 2 x [n, bs, n_kv, D]."""
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.k[layer].device)
        return self.k[layer].index_select(0, index), self.v[layer].index_select(0, index)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one exported block: (layers, 2, block_size, n_kv, D)."""
        return (self.num_layers, 2, *self.k[0].shape[1:])

    def read_blocks(self, block_ids: Sequence[int]) -> list[bytes]:
        """Each block's keys and values, all layers, as raw bytes in `block_shape` order (on the CPU)."""
        if not block_ids:
            return []
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.k[0].device)
        per_layer = [torch.stack((k.index_select(0, index), v.index_select(0, index)), dim=1)
                     for k, v in zip(self.k, self.v)]  # L x [n, 2, bs, n_kv, D]
        blocks = torch.stack(per_layer, dim=1).cpu().contiguous()  # [n, L, 2, bs, n_kv, D]
        flat = blocks.view(len(block_ids), -1).view(torch.uint8)
        return [row.numpy().tobytes() for row in flat]

    def write_blocks(self, block_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Fill blocks from bytes made by `read_blocks` (same shape and dtype)."""
        if not block_ids:
            return
        first = self.k[0]
        raw = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8)
        data = raw.view(first.dtype).view(len(block_ids), *self.block_shape).to(first.device)
        index = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
        for layer in range(self.num_layers):
            self.k[layer].index_copy_(0, index, data[:, layer, 0])
            self.v[layer].index_copy_(0, index, data[:, layer, 1])
