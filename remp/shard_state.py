"""What a worker holds at a time: its shard's spec, canonical weights and KV layers (plain data, handed between the
model runner and a switch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remp.sharding import ShardSpec


@dataclass
class ShardState:
    """What a worker holds: canonical weights (with the range of each along its shard axis) and KV layers."""

    spec: ShardSpec | None
    weights: dict[str, torch.Tensor]
    kv_layers: dict[int, torch.Tensor]  # global layer -> [2, kv_heads, blocks, block_size, D]
