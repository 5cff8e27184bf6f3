"""A toy performance model with the shape of a GPU node: TP divides the weight reads and compute but pays an
all-reduce per layer that grows with the tokens; PP pays nothing per layer, but its stages run micro-batches
one after another."""

from __future__ import annotations

from remp.policy.perf_model import Batch

LAYERS = 32


class ToyModel:
    name = "toy"

    def stage_s(self, tp: int, pp: int, b: Batch) -> float:
        if b.tokens == 0:
            return 0.0
        weights = 0.4e-3 / tp  # reading a layer's weights
        compute = 2e-6 * b.tokens / tp + 1e-9 * b.attn_pairs / tp
        all_reduce = 0.0 if tp == 1 else 30e-6 + 0.5e-6 * b.tokens
        return LAYERS // pp * (max(weights, compute) + all_reduce) + 0.5e-3

    def hop_s(self, tp: int, pp: int, b: Batch) -> float:
        return 20e-6 + 1e-8 * b.tokens

    def busy_factor(self, tp: int, pp: int, active: int) -> float:
        return 1.0

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        return 400_000
