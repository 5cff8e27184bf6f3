"""One description of the Llama family's tensors: name, shape, shard axis, and which coordinate holds which
range of it. Sharding (what a shard holds), planning (pieces and their bytes), loading (the slices to read)
and the model (the names of a layer's weights) all read it, so a new architecture is a new file like this.

Column-parallel weights (q/k/v, gate/up) are split by rows, row-parallel ones (o, down) by columns, each by
the coordinate's range of q heads, KV heads or FFN rows. The lm-head is split by rows over the last stage's TP
ranks (its slice of the vocabulary), and the final norm is whole on each of them. The embedding is whole on
every first-stage rank; when the lm-head is tied to it, the other last-stage ranks hold their vocabulary slice
of it (on a first stage they already hold it whole).
"""

from __future__ import annotations

from dataclasses import dataclass

from remp.config import ModelConfig
from remp.sharding import ShardSpec

ROWS, COLUMNS = 0, 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    layer: int  # -1: the embedding, final norm and lm-head (moved first in a switch)
    split: str | None = None  # "q", "kv", "ffn" or "vocab": sharded by that range of a coordinate; None: whole
    axis: int = ROWS  # the axis `split` slices

    @property
    def rows_per_unit(self) -> int:
        """Elements in one index along the shard axis (a row, or a column of a row-parallel weight)."""
        n = 1
        for i, d in enumerate(self.shape):
            if i != self.axis:
                n *= d
        return n


# role -> (checkpoint name suffix, split, axis) of a decoder layer's tensors
LAYER_TENSORS = {
    "input_norm": ("input_layernorm.weight", None, ROWS),
    "q": ("self_attn.q_proj.weight", "q", ROWS),
    "k": ("self_attn.k_proj.weight", "kv", ROWS),
    "v": ("self_attn.v_proj.weight", "kv", ROWS),
    "q_bias": ("self_attn.q_proj.bias", "q", ROWS),
    "k_bias": ("self_attn.k_proj.bias", "kv", ROWS),
    "v_bias": ("self_attn.v_proj.bias", "kv", ROWS),
    "o": ("self_attn.o_proj.weight", "q", COLUMNS),
    "post_norm": ("post_attention_layernorm.weight", None, ROWS),
    "gate": ("mlp.gate_proj.weight", "ffn", ROWS),
    "up": ("mlp.up_proj.weight", "ffn", ROWS),
    "down": ("mlp.down_proj.weight", "ffn", COLUMNS),
}
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def layer_names(layer: int) -> dict[str, str]:
    return {role: f"model.layers.{layer}.{suffix}" for role, (suffix, _, _) in LAYER_TENSORS.items()}


def tensor_layer(name: str) -> int:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else -1


def _layer_tensor(config: ModelConfig, layer: int, role: str) -> TensorSpec:
    H, D, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    suffix, split, axis = LAYER_TENSORS[role]
    rows = {"q": q, "kv": kv, "ffn": inter, None: H}[split]
    if role.endswith("bias") or role.endswith("norm"):
        shape = (rows,)
    elif axis == COLUMNS:
        shape = (H, rows)
    else:
        shape = (rows, H)
    return TensorSpec(f"model.layers.{layer}.{suffix}", shape, layer, split, axis)


def tensor(config: ModelConfig, name: str) -> TensorSpec:
    if name.startswith("model.layers."):
        layer, suffix = tensor_layer(name), name.split(".", 3)[3]
        role = next(r for r, (s, _, _) in LAYER_TENSORS.items() if s == suffix)
        return _layer_tensor(config, layer, role)
    if name == EMBED:
        return TensorSpec(name, (config.vocab_size, config.hidden_size), -1)
    if name == LM_HEAD:
        return TensorSpec(name, (config.vocab_size, config.hidden_size), -1, "vocab")
    if name == NORM:
        return TensorSpec(name, (config.hidden_size,), -1)
    raise KeyError(f"{name!r} is not a tensor of the {config.architecture} schema")


def shard_tensors(config: ModelConfig, spec: ShardSpec) -> dict[str, tuple[int, int]]:
    """Every tensor a shard holds, with the range it holds along the tensor's shard axis."""
    D = config.head_dim
    ranges = {
        "q": (spec.q_heads.start * D, spec.q_heads.stop * D),
        "kv": (spec.kv_heads.start * D, spec.kv_heads.stop * D),
        "ffn": (spec.ffn.start, spec.ffn.stop),
    }
    roles = [r for r in LAYER_TENSORS if config.attention_bias or not r.endswith("bias")]
    out = {}
    for layer in spec.layers:
        for role in roles:
            t = _layer_tensor(config, layer, role)
            out[t.name] = ranges[t.split] if t.split else (0, t.shape[t.axis])
    vocab = (spec.vocab.start, spec.vocab.stop)
    if spec.is_first_stage:
        out[EMBED] = (0, config.vocab_size)
    if spec.is_last_stage:
        out[NORM] = (0, config.hidden_size)
        out.setdefault(EMBED if config.tie_word_embeddings else LM_HEAD, vocab)
    return out


def slices(config: ModelConfig, name: str, lo: int, hi: int) -> tuple[slice, ...]:
    """Index of the range [lo, hi) of a tensor along its shard axis (for sliced reads and views)."""
    t = tensor(config, name)
    return (slice(None),) * t.axis + (slice(lo, hi),)
