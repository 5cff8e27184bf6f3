"""A mixture of experts, computed as transformers' MixtralSparseMoeBlock does: the router's softmax over every
expert, each token's top k renormalised to sum to one, and its output the weighted sum of those experts' SwiGLU
MLPs. A TP rank runs only its experts (whole, a contiguous range of them) for the tokens routed to them; the
TP all-reduce after the MLP sums the ranks, as it does the dense MLP's row-parallel down projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from remp.model.decoder import DenseMLP, LayerOps


class SparseMoE:
    def __init__(
        self,
        router: torch.Tensor,
        w1: torch.Tensor | None,
        w3: torch.Tensor | None,
        w2: torch.Tensor | None,
        experts: range,
        top_k: int,
    ):
        """router: [num_experts, hidden]; w1 (gate), w3 (up): [len(experts), ffn, hidden], w2 (down):
        [len(experts), hidden, ffn], this rank's experts stacked (None where it holds none)."""
        self.router, self.first, self.top_k = router, experts.start, top_k
        self.mlps = [DenseMLP(w1[i], w3[i], w2[i]) for i in range(len(experts))]

    def __call__(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        out = torch.zeros_like(x)
        if not self.mlps:  # more TP ranks than experts: this one adds nothing
            return out
        # the routing weights in float32 at least (transformers computes them in float32)
        compute = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        probs = torch.softmax(F.linear(x, self.router).to(compute), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        for local, mlp in enumerate(self.mlps):
            rows, slot = torch.where(chosen == self.first + local)
            if rows.numel():
                y = mlp(x[rows], ops).to(compute) * weights[rows, slot, None]
                out.index_add_(0, rows, y.to(x.dtype))
        return out
