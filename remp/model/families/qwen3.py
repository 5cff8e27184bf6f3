"""Qwen3: the Llama layer with an RMSNorm over each q and k head (one [head_dim] weight each, whole on every
rank) between the projection and RoPE; no q/k/v bias unless the config asks for it."""

from __future__ import annotations

from typing import Any

import torch

from remp.config import ModelConfig
from remp.model.decoder import DecoderShard, DenseMLP, Layer
from remp.model.families.family import Family, GGUFNames
from remp.model.families.llama import ATTENTION, GGUF_ATTENTION, GGUF_MLP, MLP, QKV_BIAS, attention_layer, qkv
from remp.model.layer_ops import rms_norm
from remp.model.linear import FusedLinear
from remp.model.tensors import LayerTensor
from remp.sharding import ShardSpec

QK_NORM = {
    "q_norm": LayerTensor("self_attn.q_norm.weight", ("head_dim",)),
    "k_norm": LayerTensor("self_attn.k_norm.weight", ("head_dim",)),
}


class QKNormedProjection:
    """The fused q/k/v projection, then each q and k head normalised in place."""

    def __init__(self, proj: FusedLinear, q_norm: torch.Tensor, k_norm: torch.Tensor, q_heads: int, eps: float):
        self.proj, self.q_norm, self.k_norm, self.q_heads, self.eps = proj, q_norm, k_norm, q_heads, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.proj(x)
        T, D = qkv.shape[0], self.q_norm.shape[0]
        q_cols = self.q_heads * D
        kv_cols = (qkv.shape[1] - q_cols) // 2
        for lo, hi, w in ((0, q_cols, self.q_norm), (q_cols, q_cols + kv_cols, self.k_norm)):
            qkv[:, lo:hi] = rms_norm(qkv[:, lo:hi].view(T, -1, D), w, self.eps).view(T, hi - lo)
        return qkv


def layer_tensors(config: ModelConfig) -> dict[str, LayerTensor]:
    return {**ATTENTION, **(QKV_BIAS if config.attention_bias else {}), **QK_NORM, **MLP}


def build_layer(config: ModelConfig, spec: ShardSpec, w: dict[str, torch.Tensor | None]) -> Layer:
    proj = QKNormedProjection(qkv(w), w["q_norm"], w["k_norm"], len(spec.q_heads), config.rms_norm_eps)
    return attention_layer(w, proj, DenseMLP(w["gate"], w["up"], w["down"]))


def config_fields(cfg: dict[str, Any], architecture: str) -> dict[str, Any]:
    return {}


QWEN3 = Family(
    name="qwen3",
    architectures={"Qwen3ForCausalLM": "qwen3"},
    layer_tensors=layer_tensors,
    build_layer=build_layer,
    shard=DecoderShard,
    config_fields=config_fields,
    gguf=GGUFNames(
        "qwen3",
        {**GGUF_ATTENTION, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", **GGUF_MLP},
    ),
)
