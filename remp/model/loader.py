"""Load one shard's weights from a checkpoint reader: exactly its slices, cast to the run dtype."""

from __future__ import annotations

import torch

from remp.model.checkpoint import CheckpointReader
from remp.model.schema import read_range, shard_tensors
from remp.sharding import ShardSpec


def load_shard_weights(
    reader: CheckpointReader, spec: ShardSpec, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    return {
        name: read_range(reader, name, lo, hi).to(device=device, dtype=dtype).contiguous()
        for name, (lo, hi) in shard_tensors(reader.config, spec).items()
    }
