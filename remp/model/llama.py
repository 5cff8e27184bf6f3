"""Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM2) of one shard: a range of layers and a slice
of the heads and MLP. The TP1xPP1 shard is the whole model. Weights are a plain dict keyed by checkpoint names,
so that loading and resharding are the same operation: putting named pieces in the dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from remp.config import ModelConfig
from remp.kv_cache import KVCache
from remp.model.attention import AttnMetadata, paged_attention
from remp.model.layer_ops import layer_ops, rms_norm
from remp.model.linear import FusedLinear
from remp.model.rope import RotaryEmbedding
from remp.model.schema import EMBED, LM_HEAD, NORM, layer_names, shard_tensors
from remp.sharding import ShardSpec


def lm_head_rows(config: ModelConfig, spec: ShardSpec, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """A last-stage shard's slice of the lm-head (a view of the embedding where they are tied and it is whole)."""
    name = EMBED if config.tie_word_embeddings else LM_HEAD
    lo, _ = shard_tensors(config, spec)[name]
    return weights[name].narrow(0, spec.vocab.start - lo, len(spec.vocab))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    # the old view keeps its storage alive, so an equal address cannot be a new tensor's
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


@dataclass
class Layer:
    """Execution form of one decoder layer, and the canonical tensors it was built from."""

    sources: dict[str, torch.Tensor | None]
    ln1: torch.Tensor
    qkv: FusedLinear
    o: FusedLinear
    ln2: torch.Tensor
    gate_up: FusedLinear
    down: FusedLinear

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor], layer: int, reuse: Layer | None = None) -> Layer:
        """Layer `layer` from a shard's canonical weights; `reuse` itself if it was built from the same tensors."""
        w = {role: weights.get(name) for role, name in layer_names(layer).items()}
        if reuse is not None and all(reuse.sources[r] is t for r, t in w.items()):
            return reuse
        return cls.build(w)

    @classmethod
    def build(cls, w: dict[str, torch.Tensor | None]) -> Layer:
        return cls(
            w,
            w["input_norm"],
            FusedLinear([w["q"], w["k"], w["v"]], [w["q_bias"], w["k_bias"], w["v_bias"]]),
            FusedLinear([w["o"]]),
            w["post_norm"],
            FusedLinear([w["gate"], w["up"]]),
            FusedLinear([w["down"]]),
        )


class LlamaShard:
    def __init__(
        self,
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
        self.layers = [Layer.of(weights, i, reuse.get(i)) for i in spec.layers]
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
            pending = layer.down(ops.silu_mul(layer.gate_up(x)))
            if self.all_reduce:
                self.all_reduce(pending)
        if pending is not None:
            residual.add_(pending)
        return residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and this shard's lm-head rows for the rows given: [N, hidden] -> [N, len(spec.vocab)]."""
        return self.lm_head(rms_norm(hidden, self.weights[NORM], self.config.rms_norm_eps))
