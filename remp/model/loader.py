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
    """Each tensor copied into memory of its own (a read may map the file: safetensors does, privately, so an
    unconverted tensor would stay a view of it and count as the file's pages); the reader's maps are closed
    after, so the checkpoint leaves the process's memory. A progress bar on stderr from the first shard of the
    pipeline (the others load alongside it)."""
    names = shard_tensors(reader.config, spec)
    bar = tqdm(
        names.items(), desc="Loading weights", unit="tensor", disable=bool(spec.stage or spec.tp_rank), leave=False
    )
    weights = {}
    for name, (lo, hi) in bar:
        t = read_range(reader, name, lo, hi)
        weights[name] = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)
    reader.close()
    return weights
