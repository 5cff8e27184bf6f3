"""The model's tensors, through its family: name, shape, shard axis, and which coordinate holds which range of
it. Sharding (what a shard holds), planning (pieces and their bytes), loading (the slices to read) and
resharding read the model through these functions only, so they work for every family and know none.
model/tensors.py has the terms and rules; model/families/ the descriptions.
"""

from __future__ import annotations

import torch

from remp.config import ModelConfig
from remp.model import tensors
from remp.model.checkpoint import CheckpointReader
from remp.model.families import family_of
from remp.model.tensors import TensorSpec, tensor_layer
from remp.sharding import ShardSpec

__all__ = ["read_range", "shard_tensors", "slices", "tensor", "tensor_layer"]


def tensor(config: ModelConfig, name: str) -> TensorSpec:
    return family_of(config).tensor(config, name)


def shard_tensors(config: ModelConfig, spec: ShardSpec) -> dict[str, tuple[int, int]]:
    """Every tensor a shard holds, with the range it holds along the tensor's shard axis."""
    return family_of(config).shard_tensors(config, spec)


def slices(config: ModelConfig, name: str, lo: int, hi: int) -> tuple[slice, ...]:
    """Index of the range [lo, hi) of a tensor along its shard axis (for sliced reads and views)."""
    return tensors.slices(tensor(config, name), lo, hi)


def read_range(reader: CheckpointReader, name: str, lo: int, hi: int) -> torch.Tensor:
    """The range [lo, hi) of a tensor along its shard axis, read from the checkpoint (in the dtype stored)."""
    return tensors.read_range(reader, tensor(reader.config, name), lo, hi)
