"""Load one shard's weights from a checkpoint reader: exactly its slices, cast to the run dtype."""

from __future__ import annotations

import torch

from remp.model.checkpoint import CheckpointReader
from remp.model.schema import shard_tensors, slices
from remp.sharding import ShardSpec


def load_shard_weights(
    reader: CheckpointReader, spec: ShardSpec, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    available = set(reader.names())
    weights = {}
    for name, (lo, hi) in shard_tensors(reader.config, spec).items():
        if name not in available:
            raise KeyError(f"checkpoint {reader.path} lacks tensor {name!r}")
        weights[name] = (
            reader.read(name, slices(reader.config, name, lo, hi)).to(device=device, dtype=dtype).contiguous()
        )
    return weights
