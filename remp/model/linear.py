"""Execution form of the linear layers: q/k/v and gate/up fused into one matmul each. On CPU, one to four rows
(a single stream, a small batch) go to a native kernel that streams the canonical weights in place
(remp/kernels/small_linear.cpp: 1.2-1.9x oneDNN there, float32 and bf16). More rows go to oneDNN with the weight
pre-packed where it supports the dtype: float32 on any x86 CPU with AVX2 (12-15% faster than plain matmuls at
serving batch sizes, 2x at batch 1, on 2 AVX2 cores), bfloat16 where the CPU has native bf16 (~1.6x at decode
batch sizes on AVX512-BF16); elsewhere plain matmuls, which work in any dtype (float64 included).

The canonical weights stay in the shard's dict under their checkpoint names (they are what loading and
resharding move); these are derived from them and rebuilt whenever the dict changes. The tensors a linear fuses
are put side by side in one buffer first (`colocate`: the dict's entries become views of it), so the fused
weight is a view of them, not a second copy; the packed weight is the one copy left (what it buys:
`bench/packed_linear.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from remp.cpu_features import cpu_features
from remp.kernels import small_linear


def _can_pack(w: torch.Tensor) -> bool:
    if w.device.type != "cpu":
        return False
    cpu = cpu_features()
    return (w.dtype == torch.bfloat16 and cpu.onednn_bf16) or (w.dtype == torch.float32 and cpu.onednn_fp32)


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def colocated(tensors: list[torch.Tensor], dim: int = 0) -> bool:
    """Whether the tensors are consecutive slices along `dim` of one contiguous buffer, in this order."""
    first = tensors[0]
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    strides, offset = _contiguous_strides(shape), first.storage_offset()
    for t in tensors:
        same_storage = t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not same_storage or t.stride() != strides or t.storage_offset() != offset or t.dtype != first.dtype:
            return False
        offset += t.shape[dim] * strides[dim]
    return True


def colocate(tensors: list[torch.Tensor], dim: int = 0) -> list[torch.Tensor]:
    """The tensors as views of one buffer (their concatenation along `dim`), or themselves if they are already."""
    if colocated(tensors, dim):
        return tensors
    return list(torch.cat(tensors, dim).split([t.shape[dim] for t in tensors], dim))


def _fuse(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[n_i, ...] tensors as one [sum n_i, ...]: a view where they are colocated, else a copy."""
    if len(tensors) == 1:
        return tensors[0]
    if colocated(tensors):
        first = tensors[0]
        shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
        return first.as_strided(shape, _contiguous_strides(list(shape)))
    return torch.cat(tensors)


class FusedLinear:
    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, batch_hint: int = 64
    ):
        self.source = weights[0]  # to tell whether a rebuilt shard still has the same weights
        weight = _fuse(weights)
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = _fuse([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
        self.packed = _can_pack(weight)
        self.weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint) if self.packed else weight
        )
        # a few rows (a single stream, a small batch): the native kernel streams the canonical weights in place
        self.small = (
            small_linear.Segments(weights, self.bias) if small_linear.Segments.fits(weights, self.bias) else None
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.small is not None and x.dim() == 2 and 1 <= x.shape[0] <= small_linear.MAX_ROWS and x.stride(1) == 1:
            return small_linear.small_linear(x, self.small)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
