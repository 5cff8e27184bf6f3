"""A worker's slice of the paged KV cache: its layers x its KV heads, for every logical block id.

Block ids are the scheduler's and the same on every worker; only the layer and head extents differ.
"""

from __future__ import annotations

import torch


def kv_bytes_per_block(num_layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        # Zeroed, not empty: masked-out keys still pass through the matmuls, and garbage NaNs would leak.
        self.data = torch.zeros(num_layers, 2, kv_heads, num_blocks, block_size, head_dim, dtype=dtype,
                                device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of local layer i, each [kv_heads, num_blocks, block_size, head_dim] (head-major)."""
        return self.data[i, 0], self.data[i, 1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
