"""Mixtral: the Llama attention, and a mixture of experts in place of the MLP. The router
(`block_sparse_moe.gate.weight`, [experts, hidden]) is whole on every rank; the experts' w1 / w3 / w2 are
described as stacked tensors ([experts, ...], split along the expert axis), so a TP rank holds whole experts
and a switch moves ranges of experts like any other range (model/tensors.py reads them from the per-expert
tensors of a Hugging Face checkpoint, or from GGUF's stacked ones)."""

from __future__ import annotations

from typing import Any

import torch

from remp.config import ModelConfig, UnsupportedModelError
from remp.model.decoder import DecoderShard, Layer
from remp.model.families.family import Family, GGUFNames
from remp.model.families.llama import ATTENTION, GGUF_ATTENTION, attention_layer, qkv
from remp.model.moe import SparseMoE
from remp.model.tensors import LayerTensor
from remp.sharding import ShardSpec

EXPERTS = {
    "router": LayerTensor("block_sparse_moe.gate.weight", ("experts", "hidden")),
    "w1": LayerTensor("block_sparse_moe.experts.*.w1.weight", ("experts", "ffn", "hidden"), 0),
    "w3": LayerTensor("block_sparse_moe.experts.*.w3.weight", ("experts", "ffn", "hidden"), 0),
    "w2": LayerTensor("block_sparse_moe.experts.*.w2.weight", ("experts", "hidden", "ffn"), 0),
}


def layer_tensors(config: ModelConfig) -> dict[str, LayerTensor]:
    return {**ATTENTION, **EXPERTS}


def build_layer(config: ModelConfig, spec: ShardSpec, w: dict[str, torch.Tensor | None]) -> Layer:
    moe = SparseMoE(w["router"], w["w1"], w["w3"], w["w2"], spec.experts, config.num_experts_per_tok)
    return attention_layer(w, qkv(w), moe)


def config_fields(cfg: dict[str, Any], architecture: str) -> dict[str, Any]:
    if cfg.get("attention_bias"):
        raise UnsupportedModelError("Mixtral with attention_bias is not supported")
    return {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}


def gguf_config_fields(meta: dict[str, Any]) -> dict[str, Any]:
    return {"num_experts": int(meta["llama.expert_count"]), "num_experts_per_tok": int(meta["llama.expert_used_count"])}


MIXTRAL = Family(
    name="mixtral",
    architectures={"MixtralForCausalLM": "mixtral"},
    layer_tensors=layer_tensors,
    build_layer=build_layer,
    shard=DecoderShard,
    config_fields=config_fields,
    gguf=GGUFNames(
        "llama",  # llama.cpp writes Mixtral as a llama with experts
        {
            **GGUF_ATTENTION,
            "ffn_gate_inp": "block_sparse_moe.gate",
            "ffn_gate_exps": "block_sparse_moe.experts.*.w1",
            "ffn_up_exps": "block_sparse_moe.experts.*.w3",
            "ffn_down_exps": "block_sparse_moe.experts.*.w2",
        },
        permuted_qk=True,
        accepts=lambda meta: bool(meta.get("llama.expert_count")),
        config_fields=gguf_config_fields,
    ),
)
