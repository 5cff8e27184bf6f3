"""What a model family gives remp: the architecture names it answers to, its tensors (the schema), how it builds
one decoder layer's execution form, its shard forward, its own config fields, and its GGUF names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from remp.config import ModelConfig
from remp.model.tensors import (
    LAYER_PREFIX,
    LayerTensor,
    TensorSpec,
    global_ranges,
    global_tensor,
    layer_ranges,
    layer_tensor,
    tensor_layer,
)
from remp.sharding import ShardSpec


class ExecutionLayer(Protocol):
    sources: dict[str, torch.Tensor | None]  # the canonical tensors it was built from, by role


def no_fields(*_: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class GGUFNames:
    """How llama.cpp's converter wrote a family's tensors."""

    architecture: str  # `general.architecture` of its files
    layer_names: Mapping[str, str]  # within a block: GGUF name -> Hugging Face name ("attn_q" -> "self_attn.q_proj")
    permuted_qk: bool = False  # q/k rows permuted for interleaved RoPE pairs (llama.cpp's llama converter)
    accepts: Callable[[dict[str, Any]], bool] = lambda meta: True  # a file of `architecture` is this family's
    config_fields: Callable[[dict[str, Any]], dict[str, Any]] = no_fields  # ModelConfig fields of its own


@dataclass(frozen=True)
class Family:
    name: str  # also the `config.architecture` of its GGUF files
    architectures: Mapping[str, str]  # Hugging Face `architectures[0]` -> `config.architecture`
    layer_tensors: Callable[[ModelConfig], dict[str, LayerTensor]]  # role -> tensor of every decoder layer
    build_layer: Callable[[ModelConfig, ShardSpec, dict[str, torch.Tensor | None]], ExecutionLayer]
    shard: type  # the shard forward: shard(family, config, spec, weights, rope, all_reduce, reuse)
    # (config.json, config.architecture) -> ModelConfig fields of its own; refuses what it cannot run
    config_fields: Callable[[dict[str, Any], str], dict[str, Any]] = no_fields
    gguf: GGUFNames | None = None

    def tensor(self, config: ModelConfig, name: str) -> TensorSpec:
        if not name.startswith(LAYER_PREFIX):
            return global_tensor(config, name)
        suffix = name.split(".", 3)[3]
        t = next((t for t in self.layer_tensors(config).values() if t.suffix == suffix), None)
        if t is None:
            raise KeyError(f"{name!r} is not a tensor of the {config.architecture} schema")
        return layer_tensor(config, tensor_layer(name), t)

    def shard_tensors(self, config: ModelConfig, spec: ShardSpec) -> dict[str, tuple[int, int]]:
        """Every tensor a shard holds, with the range it holds along the tensor's shard axis."""
        return {**layer_ranges(config, self.layer_tensors(config), spec), **global_ranges(config, spec)}

    def layer(
        self,
        config: ModelConfig,
        spec: ShardSpec,
        weights: dict[str, torch.Tensor],
        layer: int,
        reuse: ExecutionLayer | None = None,
    ) -> ExecutionLayer:
        """Layer `layer`'s execution form from a shard's canonical weights; `reuse` itself if it was built from
        the very same tensors (then it holds the same ranges, so it is the same layer)."""
        w = {role: weights.get(f"{LAYER_PREFIX}{layer}.{t.suffix}") for role, t in self.layer_tensors(config).items()}
        if reuse is not None and all(reuse.sources.get(r) is t for r, t in w.items()):
            return reuse
        return self.build_layer(config, spec, w)
