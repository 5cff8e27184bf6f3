"""Execution form of the linear layers: q/k/v and gate/up fused into one matmul each, and on CPU in bfloat16
the weight pre-packed for oneDNN (~1.6x faster at decode batch sizes on AVX512-BF16) where oneDNN supports
it; elsewhere (AVX2-only CPUs) plain matmuls, which work in any dtype.

The canonical weights stay in the shard's dict under their checkpoint names (they are what loading and
resharding move); these are derived from them and rebuilt whenever the dict changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from remp.cpu_features import cpu_features

# A matmul with a very wide output (the lm-head: vocab rows) runs ~1.5x faster on CPU in slices of this many
# output rows, once there are a few input rows (bench: 64 x 576 -> 49152 fp32 on 2 AVX2 cores, 56 -> 36 ms)
SLICE_ROWS, SLICE_MIN_ROWS_IN = 2048, 8


def _can_pack(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and cpu_features().onednn_bf16


class FusedLinear:
    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None, batch_hint: int = 64
    ):
        self.source = weights[0]  # to tell whether a rebuilt shard still has the same weights
        self.splits = [w.shape[0] for w in weights]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        self.bias = None
        if biases and any(b is not None for b in biases):
            self.bias = torch.cat([b if b is not None else weight.new_zeros(n) for b, n in zip(biases, self.splits)])
        self.packed = _can_pack(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if self.packed else weight
        self.slices = None
        if not self.packed and weight.device.type == "cpu" and weight.shape[0] >= 4 * SLICE_ROWS:
            biases = (
                self.bias.split(SLICE_ROWS) if self.bias is not None else [None] * -(-weight.shape[0] // SLICE_ROWS)
            )
            self.slices = list(zip(weight.split(SLICE_ROWS), biases))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.slices is not None and x.shape[0] >= SLICE_MIN_ROWS_IN:
            return torch.cat([F.linear(x, w, b) for w, b in self.slices], dim=-1)
        return F.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.splits, dim=-1)
