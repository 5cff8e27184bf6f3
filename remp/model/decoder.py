"""The decoder forward pass of one shard, shared by every family: a range of layers and a slice of the heads and
MLP (or of the experts). The TP1xPP1 shard is the whole model. Weights are a plain dict keyed by checkpoint
names, so that loading and resharding are the same operation: putting named pieces in the dict. A family
builds each layer's execution form (`Layer`) from them: its q/k/v projection (with a q/k norm, Qwen3) and its
MLP (dense, or a mixture of experts) are callables, so the loop below is the same for all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from remp.config import ModelConfig
from remp.kv_cache import KVCache
from remp.model.attention import AttnMetadata, paged_attention
from remp.model.families.family import Family
from remp.model.layer_ops import layer_ops, rms_norm
from remp.model.linear import FusedLinear
from remp.model.rope import RotaryEmbedding
from remp.model.tensors import EMBED, LM_HEAD, NORM, global_ranges
from remp.sharding import ShardSpec


def lm_head_rows(config: ModelConfig, spec: ShardSpec, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """A last-stage shard's slice of the lm-head (a view of the embedding where they are tied and it is whole)."""
    name = EMBED if config.tie_word_embeddings else LM_HEAD
    lo, _ = global_ranges(config, spec)[name]
    return weights[name].narrow(0, spec.vocab.start - lo, len(spec.vocab))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    # the old view keeps its storage alive, so an equal address cannot be a new tensor's
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


class LayerOps(Protocol):
    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...


class DenseMLP:
    """down(silu(gate) * up), gate and up fused; this rank's FFN rows (the down projection's columns)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        self.gate_up, self.down = FusedLinear([gate, up]), FusedLinear([down])

    def __call__(self, x: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        return self.down(ops.silu_mul(self.gate_up(x)))


@dataclass
class Layer:
    """Execution form of one decoder layer, and the canonical tensors it was built from."""

    sources: dict[str, torch.Tensor | None]
    ln1: torch.Tensor
    qkv: Callable[[torch.Tensor], torch.Tensor]  # [T, hidden] -> [T, q | k | v] of this rank's heads
    o: FusedLinear
    ln2: torch.Tensor
    mlp: Callable[[torch.Tensor, LayerOps], torch.Tensor]  # [T, hidden] -> this rank's part of the MLP's output


class DecoderShard:
    def __init__(
        self,
        family: Family,
        config: ModelConfig,
        spec: ShardSpec,
        weights: dict[str, torch.Tensor],
        rope: RotaryEmbedding,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        reuse: dict[int, Layer | FusedLinear] | None = None,
    ):
        """The fused / packed execution weights are derived from the canonical dict; a layer in `reuse` (by
        global index; -1 for the lm-head) built from the very tensors given here is taken over as it is, so a
        switch re-packs only what changed."""
        self.config, self.spec, self.weights, self.rope = config, spec, weights, rope
        self.all_reduce = all_reduce  # in-place sum over the TP group; None when tp == 1
        self.kv_heads = len(spec.kv_heads)
        self.q_per_kv = len(spec.q_heads) // self.kv_heads
        reuse = reuse or {}
        self.layers = [family.layer(config, spec, weights, i, reuse.get(i)) for i in spec.layers]
        self.lm_head = None
        if spec.is_last_stage:
            head = lm_head_rows(config, spec, weights)
            old = reuse.get(-1)
            self.lm_head = old if old is not None and _same_view(old.source, head) else FusedLinear([head])

    def execution_layers(self) -> dict[int, Layer | FusedLinear]:
        """This shard's execution form by global layer (-1: the lm-head), for a successor to reuse."""
        out: dict[int, Layer | FusedLinear] = dict(zip(self.spec.layers, self.layers))
        if self.lm_head is not None:
            out[-1] = self.lm_head
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weights[EMBED])

    def forward(self, hidden: torch.Tensor, meta: AttnMetadata, kv: KVCache) -> torch.Tensor:
        """hidden: [T, hidden] -> [T, hidden] after this shard's layers (before the final norm)."""
        cfg, D = self.config, self.config.head_dim
        T, kvh = hidden.shape[0], self.kv_heads
        q_heads = self.q_per_kv * kvh
        qk_cols = (q_heads + kvh) * D
        ops = layer_ops(hidden.dtype, hidden.device)
        cos, sin = self.rope.tables(meta.positions)
        residual, pending = hidden.clone(), None  # pending: the last sublayer's output, not yet added in
        for local, layer in enumerate(self.layers):
            x = ops.add_rms_norm(residual, pending, layer.ln1, cfg.rms_norm_eps)
            qkv = layer.qkv(x)  # [T, q | k | v]
            k_cache, v_cache = kv.layer(local)
            ops.rope_cache(qkv, cos, sin, q_heads, kvh, k_cache, v_cache, meta.slot_mapping)
            q = qkv[:, : q_heads * D].view(T, kvh, self.q_per_kv, D)
            k, v = qkv[:, q_heads * D : qk_cols].view(T, kvh, D), qkv[:, qk_cols:].view(T, kvh, D)
            o = layer.o(paged_attention(q, k, v, k_cache, v_cache, meta))
            if self.all_reduce:
                self.all_reduce(o)
            x = ops.add_rms_norm(residual, o, layer.ln2, cfg.rms_norm_eps)
            pending = layer.mlp(x, ops)
            if self.all_reduce:
                self.all_reduce(pending)
        if pending is not None:
            residual.add_(pending)
        return residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and this shard's lm-head rows for the rows given: [N, hidden] -> [N, len(spec.vocab)]."""
        return self.lm_head(rms_norm(hidden, self.weights[NORM], self.config.rms_norm_eps))
