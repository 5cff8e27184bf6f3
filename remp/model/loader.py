"""Load one shard's weights from a checkpoint reader: exactly its slices, cast to the run dtype."""

from __future__ import annotations

import torch

from remp.model.reader import CheckpointReader
from remp.sharding import ShardSpec, weight_slices


def load_shard_weights(
    reader: CheckpointReader, spec: ShardSpec, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    available = set(reader.names())
    weights = {}
    for name, slices in weight_slices(reader.config, spec).items():
        if name not in available:
            raise KeyError(f"checkpoint {reader.path} lacks tensor {name!r}")
        weights[name] = reader.read(name, slices).to(device=device, dtype=dtype).contiguous()
    return weights
