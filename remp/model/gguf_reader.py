"""GGUF files of the llama architecture: config and tokenizer from the metadata, tensors dequantized by `gguf`.

llama.cpp's converter permutes the rows of attn_q / attn_k (interleaved RoPE pairs); we undo it so the
tensors are in Hugging Face layout and the forward pass is the same as for safetensors checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from remp.config import ModelConfig
from remp.model.reader import Slices

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None  # e.g. rope_freqs.weight, handled separately


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows (pairs interleaved) -> (first half, second half)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:
        return None


class GGUFReader:
    def __init__(self, path: Path):
        self.path = path
        self._reader = gguf.GGUFReader(str(path))
        self._tensors = {t.name: t for t in self._reader.tensors}
        big = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
        meta = {k: _field_value(f) for k, f in self._reader.fields.items() if k not in big}
        meta["tokenizer.ggml.tokens"] = (
            range(len(self._reader.fields["tokenizer.ggml.tokens"].data))
            if "tokenizer.ggml.tokens" in self._reader.fields
            else []
        )
        self.metadata = meta
        self.config = ModelConfig.from_gguf_metadata(meta, set(self._tensors))
        self._by_hf = {hf: name for name in self._tensors if (hf := _hf_name(name)) is not None}

    def names(self) -> list[str]:
        return list(self._by_hf)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[self._gguf_name(name)]
        return tuple(int(d) for d in reversed(t.shape))  # ggml lists dims innermost first

    def _gguf_name(self, name: str) -> str:
        try:
            return self._by_hf[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}") from None

    def read(self, name: str, slices: Slices = ()) -> torch.Tensor:
        t = self._tensors[self._gguf_name(name)]
        # Quantized blocks run along rows, so the whole tensor is dequantized, then sliced (one tensor at a time).
        w = gguf.dequantize(t.data, t.tensor_type).reshape(self.shape(name))
        cfg = self.config
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            w = unpermute_rows(w, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            w = unpermute_rows(w, cfg.num_key_value_heads)
        out = torch.from_numpy(np.array(w, copy=True))  # copy: the file is memory-mapped read-only
        return out[slices].contiguous() if slices else out

    def rope_freq_factors(self) -> torch.Tensor | None:
        """Llama-3 GGUFs store the RoPE frequency divisors as a tensor instead of rope_scaling metadata."""
        t = self._tensors.get("rope_freqs.weight")
        return None if t is None else torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
