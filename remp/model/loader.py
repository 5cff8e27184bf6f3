"""Load one shard's weights from a checkpoint reader: exactly its slices, cast to the run dtype."""

from __future__ import annotations

import torch
from tqdm import tqdm

from remp.model.checkpoint import CheckpointReader
from remp.model.schema import read_range, shard_tensors
from remp.sharding import ShardSpec


def load_shard_weights(
    reader: CheckpointReader, spec: ShardSpec, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A progress bar on stderr from the first shard of the pipeline (the others load alongside it)."""
    names = shard_tensors(reader.config, spec)
    bar = tqdm(
        names.items(), desc="Loading weights", unit="tensor", disable=bool(spec.stage or spec.tp_rank), leave=False
    )
    return {
        name: read_range(reader, name, lo, hi).to(device=device, dtype=dtype).contiguous() for name, (lo, hi) in bar
    }
