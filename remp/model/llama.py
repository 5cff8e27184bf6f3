"""Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM2) of one shard: a range of layers and a slice
of the heads and MLP. The TP1xPP1 shard is the whole model. Weights are a plain dict keyed by checkpoint names,
so that loading and resharding are the same operation: putting named pieces in the dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from remp.config import ModelConfig
from remp.kv_cache import KVCache
from remp.model.attention import AttnMetadata, paged_attention, write_kv
from remp.model.linear import FusedLinear
from remp.model.rope import RotaryEmbedding
from remp.sharding import ShardSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 (or wider), as Hugging Face does, then scale in the model dtype.
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaShard:
    def __init__(
        self,
        config: ModelConfig,
        spec: ShardSpec,
        weights: dict[str, torch.Tensor],
        rope: RotaryEmbedding,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ):
        self.config, self.spec, self.weights, self.rope = config, spec, weights, rope
        self.all_reduce = all_reduce  # in-place sum over the TP group; None when tp == 1
        self.kv_heads = len(spec.kv_heads)
        self.q_per_kv = len(spec.q_heads) // self.kv_heads
        self.rebuild()

    def rebuild(self) -> None:
        """Derive the fused / packed execution weights from the canonical dict (after loading or resharding)."""
        self.layers = []
        for i in self.spec.layers:
            w = lambda name, i=i: self.weights.get(f"model.layers.{i}.{name}")
            attn = [f"self_attn.{p}_proj" for p in "qkv"]
            self.layers.append(
                (
                    w("input_layernorm.weight"),
                    FusedLinear([w(p + ".weight") for p in attn], [w(p + ".bias") for p in attn]),
                    FusedLinear([w("self_attn.o_proj.weight")]),
                    w("post_attention_layernorm.weight"),
                    FusedLinear([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]),
                    FusedLinear([w("mlp.down_proj.weight")]),
                )
            )
        head = self.weights.get("lm_head.weight", self.weights.get("model.embed_tokens.weight"))
        self.lm_head = FusedLinear([head]) if self.spec.is_sampler else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weights["model.embed_tokens.weight"])

    def forward(self, hidden: torch.Tensor, meta: AttnMetadata, kv: KVCache) -> torch.Tensor:
        """hidden: [T, hidden] -> [T, hidden] after this shard's layers (before the final norm)."""
        cfg, D = self.config, self.config.head_dim
        for local, (ln1, qkv_proj, o_proj, ln2, gate_up_proj, down_proj) in enumerate(self.layers):
            x = rms_norm(hidden, ln1, cfg.rms_norm_eps)
            q, k, v = qkv_proj.split(qkv_proj(x))
            T = x.shape[0]
            q = self.rope.apply(q.view(T, -1, D), meta.positions)
            k = self.rope.apply(k.view(T, self.kv_heads, D), meta.positions)
            k_cache, v_cache = kv.layer(local)
            write_kv(k_cache, v_cache, meta.slot_mapping, k, v.view(T, self.kv_heads, D))
            attn = paged_attention(q.view(T, self.kv_heads, self.q_per_kv, D), k_cache, v_cache, meta)
            o = o_proj(attn)
            if self.all_reduce:
                self.all_reduce(o)
            hidden = hidden + o
            x = rms_norm(hidden, ln2, cfg.rms_norm_eps)
            gate, up = gate_up_proj.split(gate_up_proj(x))
            m = down_proj(F.silu(gate) * up)
            if self.all_reduce:
                self.all_reduce(m)
            hidden = hidden + m
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm-head of the rows given: [N, hidden] -> [N, vocab]."""
        return self.lm_head(rms_norm(hidden, self.weights["model.norm.weight"], self.config.rms_norm_eps))
