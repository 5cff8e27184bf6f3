"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2): attention with optional q/k/v bias (Qwen2 always has
it), a dense SwiGLU MLP. The other families are built from its pieces."""

from __future__ import annotations

from typing import Any

import torch

from remp.config import ModelConfig
from remp.model.decoder import DecoderShard, DenseMLP, Layer
from remp.model.families.family import Family, GGUFNames
from remp.model.linear import FusedLinear
from remp.model.tensors import COLUMNS, ROWS, LayerTensor
from remp.sharding import ShardSpec

ATTENTION = {
    "input_norm": LayerTensor("input_layernorm.weight", ("hidden",)),
    "q": LayerTensor("self_attn.q_proj.weight", ("q", "hidden"), ROWS),
    "k": LayerTensor("self_attn.k_proj.weight", ("kv", "hidden"), ROWS),
    "v": LayerTensor("self_attn.v_proj.weight", ("kv", "hidden"), ROWS),
    "o": LayerTensor("self_attn.o_proj.weight", ("hidden", "q"), COLUMNS),
    "post_norm": LayerTensor("post_attention_layernorm.weight", ("hidden",)),
}
QKV_BIAS = {
    "q_bias": LayerTensor("self_attn.q_proj.bias", ("q",), ROWS),
    "k_bias": LayerTensor("self_attn.k_proj.bias", ("kv",), ROWS),
    "v_bias": LayerTensor("self_attn.v_proj.bias", ("kv",), ROWS),
}
MLP = {
    "gate": LayerTensor("mlp.gate_proj.weight", ("ffn", "hidden"), ROWS),
    "up": LayerTensor("mlp.up_proj.weight", ("ffn", "hidden"), ROWS),
    "down": LayerTensor("mlp.down_proj.weight", ("hidden", "ffn"), COLUMNS),
}

# llama.cpp's names within a block
GGUF_ATTENTION = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}
GGUF_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def layer_tensors(config: ModelConfig) -> dict[str, LayerTensor]:
    return {**ATTENTION, **(QKV_BIAS if config.attention_bias else {}), **MLP}


def qkv(w: dict[str, torch.Tensor | None]) -> FusedLinear:
    return FusedLinear([w["q"], w["k"], w["v"]], [w.get("q_bias"), w.get("k_bias"), w.get("v_bias")])


def attention_layer(w: dict[str, torch.Tensor | None], qkv, mlp) -> Layer:
    """A layer with this family's norms and output projection around a family's q/k/v projection and MLP."""
    return Layer(w, w["input_norm"], qkv, FusedLinear([w["o"]]), w["post_norm"], mlp)


def build_layer(config: ModelConfig, spec: ShardSpec, w: dict[str, torch.Tensor | None]) -> Layer:
    return attention_layer(w, qkv(w), DenseMLP(w["gate"], w["up"], w["down"]))


def config_fields(cfg: dict[str, Any], architecture: str) -> dict[str, Any]:
    return {"attention_bias": True} if architecture == "qwen2" else {}


LLAMA = Family(
    name="llama",
    architectures={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"},
    layer_tensors=layer_tensors,
    build_layer=build_layer,
    shard=DecoderShard,
    config_fields=config_fields,
    gguf=GGUFNames(
        "llama",
        {**GGUF_ATTENTION, **GGUF_MLP},
        permuted_qk=True,
        accepts=lambda meta: not meta.get("llama.expert_count"),  # with experts: Mixtral (mixtral.py)
    ),
)
