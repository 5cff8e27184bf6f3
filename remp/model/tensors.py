"""The terms a family describes its tensors in, and the rules that turn a description and a shard spec into the
ranges a shard holds.

A tensor's shape is a tuple of named dimensions ("hidden", "q", "kv", "ffn", "head_dim", "experts", "vocab");
one of them may be its shard axis, and then each coordinate holds its range of that dimension: q heads, KV
heads, FFN rows, whole experts, or the vocabulary. Column-parallel weights (q/k/v, gate/up) are split by rows,
row-parallel ones (o, down) by columns. The globals are the same for every family: the lm-head is split by
rows over the last stage's TP ranks (its slice of the vocabulary), and the final norm is whole on each of them.
The embedding is whole on every first-stage rank; when the lm-head is tied to it, the other last-stage ranks
hold their vocabulary slice of it (on a first stage they already hold it whole).

A stacked tensor ("*" in its name, e.g. `...experts.*.w1.weight` [experts, ffn, hidden]) is one per index of
its first dimension in a Hugging Face checkpoint (`...experts.0.w1.weight`, ...): planning and resharding see
one tensor with ranges along that axis; reading stacks the checkpoint's tensors (`read_range`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remp.config import ModelConfig
from remp.model.checkpoint import CheckpointReader
from remp.sharding import ShardSpec

ROWS, COLUMNS = 0, 1
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    layer: int  # -1: the embedding, final norm and lm-head (moved first in a switch)
    split: str | None = None  # the dimension sharded ("q", "kv", "ffn", "experts", "vocab"); None: whole
    axis: int = ROWS  # the axis `split` slices

    @property
    def rows_per_unit(self) -> int:
        """Elements in one index along the shard axis (a row, a column of a row-parallel weight, an expert)."""
        n = 1
        for i, d in enumerate(self.shape):
            if i != self.axis:
                n *= d
        return n


@dataclass(frozen=True)
class LayerTensor:
    """One tensor of every decoder layer, as a family describes it."""

    suffix: str  # its checkpoint name after "model.layers.{i}."
    dims: tuple[str, ...]
    split_axis: int | None = None  # the axis sharded by the coordinate's range of that dimension; None: whole


def dims(config: ModelConfig) -> dict[str, int]:
    D = config.head_dim
    return {
        "hidden": config.hidden_size,
        "q": config.num_attention_heads * D,
        "kv": config.num_key_value_heads * D,
        "ffn": config.intermediate_size,
        "head_dim": D,
        "experts": config.num_experts,
        "vocab": config.vocab_size,
    }


def held_ranges(config: ModelConfig, spec: ShardSpec) -> dict[str, tuple[int, int]]:
    """The range of each split dimension a shard holds."""
    D = config.head_dim
    return {
        "q": (spec.q_heads.start * D, spec.q_heads.stop * D),
        "kv": (spec.kv_heads.start * D, spec.kv_heads.stop * D),
        "ffn": (spec.ffn.start, spec.ffn.stop),
        "experts": (spec.experts.start, spec.experts.stop),
        "vocab": (spec.vocab.start, spec.vocab.stop),
    }


def tensor_layer(name: str) -> int:
    return int(name.split(".")[2]) if name.startswith(LAYER_PREFIX) else -1


def layer_tensor(config: ModelConfig, layer: int, t: LayerTensor) -> TensorSpec:
    sizes = dims(config)
    axis = ROWS if t.split_axis is None else t.split_axis
    split = None if t.split_axis is None else t.dims[t.split_axis]
    return TensorSpec(f"{LAYER_PREFIX}{layer}.{t.suffix}", tuple(sizes[d] for d in t.dims), layer, split, axis)


def global_tensor(config: ModelConfig, name: str) -> TensorSpec:
    V, H = config.vocab_size, config.hidden_size
    if name == EMBED:
        return TensorSpec(name, (V, H), -1)
    if name == LM_HEAD:
        return TensorSpec(name, (V, H), -1, "vocab")
    if name == NORM:
        return TensorSpec(name, (H,), -1)
    raise KeyError(f"{name!r} is not a tensor of the {config.architecture} schema")


def global_ranges(config: ModelConfig, spec: ShardSpec) -> dict[str, tuple[int, int]]:
    """The embedding, final norm and lm-head a shard holds, with their ranges."""
    out = {}
    vocab = (spec.vocab.start, spec.vocab.stop)
    if spec.is_first_stage:
        out[EMBED] = (0, config.vocab_size)
    if spec.is_last_stage:
        out[NORM] = (0, config.hidden_size)
        out.setdefault(EMBED if config.tie_word_embeddings else LM_HEAD, vocab)
    return out


def layer_ranges(config: ModelConfig, table: dict[str, LayerTensor], spec: ShardSpec) -> dict[str, tuple[int, int]]:
    """Every decoder-layer tensor a shard holds, with its range along the shard axis; a tensor whose range is
    empty (experts on a rank that holds none) is not held at all."""
    ranges, out = held_ranges(config, spec), {}
    for layer in spec.layers:
        for t in table.values():
            s = layer_tensor(config, layer, t)
            lo, hi = ranges[s.split] if s.split else (0, s.shape[s.axis])
            if lo < hi:
                out[s.name] = (lo, hi)
    return out


def slices(t: TensorSpec, lo: int, hi: int) -> tuple[slice, ...]:
    """Index of the range [lo, hi) of a tensor along its shard axis (for sliced reads and views)."""
    return (slice(None),) * t.axis + (slice(lo, hi),)


def read_range(reader: CheckpointReader, t: TensorSpec, lo: int, hi: int) -> torch.Tensor:
    """The range [lo, hi) of a tensor along its shard axis, from the checkpoint. A stacked tensor the file
    stores per index (Hugging Face) is read index by index and stacked; a file that stores it stacked (GGUF)
    is read like any other."""
    if "*" not in t.name or reader.has(t.name):
        return reader.read(t.name, slices(t, lo, hi))
    if t.axis != 0:
        raise ValueError(f"{t.name}: a stacked tensor must be split along its stacking axis")
    return torch.stack([reader.read(t.name.replace("*", str(i))) for i in range(lo, hi)])
