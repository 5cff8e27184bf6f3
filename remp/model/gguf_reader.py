"""GGUF files: config and tokenizer from the metadata, tensors dequantized by `gguf`, named as Hugging Face
names them by the family the file's `general.architecture` picks (model/families/).

llama.cpp's llama converter permutes the rows of attn_q / attn_k (interleaved RoPE pairs); we undo it so the
tensors are in Hugging Face layout and the forward pass is the same as for safetensors checkpoints.
The file is parsed once per machine: its metadata and tensor table (name -> type, shape, offset) and the
converted tokenizer are cached (file_cache), and tensors are read from a memory map by offset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from remp.model.checkpoint import Slices
from remp.model.families import config_from_gguf, family_for_gguf
from remp.model.file_cache import cached_dir, cached_json

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _hf_name(gguf_name: str, layer_names: Mapping[str, str]) -> str | None:
    """The Hugging Face name of a GGUF tensor, by the family's names within a block."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    return None  # e.g. rope_freqs.weight, handled separately


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows (pairs interleaved) -> (first half, second half)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # exotic field types we do not need
        return None


_BIG_FIELDS = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
_PLAIN_TYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
}


def parse_index(path: Path) -> dict[str, Any]:
    """The metadata we use (JSON values; the vocabulary only as its size) and the tensor table."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: _field_value(f) for k, f in reader.fields.items() if k not in _BIG_FIELDS}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["tokenizer.ggml.vocab_size"] = len(tokens.data) if tokens is not None else 0
    tensors = {
        t.name: [int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes)]
        for t in reader.tensors
    }
    return {"metadata": meta, "tensors": tensors}


class GGUFReader:
    def __init__(self, path: Path):
        self.path = path
        index = cached_json(path, "gguf_index.json", lambda: parse_index(path))
        self.metadata = index["metadata"]
        self._tensors = {
            name: (GGMLQuantizationType(t), tuple(shape), off, n)
            for name, (t, shape, off, n) in index["tensors"].items()
        }
        self.config = config_from_gguf(self.metadata, set(self._tensors))
        names = family_for_gguf(self.metadata).gguf
        self._permuted_qk = names.permuted_qk
        self._by_hf = {hf: name for name in self._tensors if (hf := _hf_name(name, names.layer_names)) is not None}
        self._map: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}  # the memory map is reopened where the reader lands

    def names(self) -> list[str]:
        return list(self._by_hf)

    def has(self, name: str) -> bool:
        return name in self._by_hf

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._tensors[self._gguf_name(name)][1]))  # ggml lists dims innermost first

    def _gguf_name(self, name: str) -> str:
        try:
            return self._by_hf[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}") from None

    def _dequantize(self, gguf_name: str) -> np.ndarray:
        qtype, shape, offset, n_bytes = self._tensors[gguf_name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw, dims = self._map[offset : offset + n_bytes], tuple(reversed(shape))
        if qtype in _PLAIN_TYPES:
            data = raw.view(_PLAIN_TYPES[qtype]).reshape(dims)
        else:
            data = raw.reshape(gguf.quant_shape_to_byte_shape(dims, qtype))
        return gguf.dequantize(data, qtype).reshape(dims)

    def read(self, name: str, slices: Slices = ()) -> torch.Tensor:
        # Quantized blocks run along rows, so the whole tensor is dequantized, then sliced (one tensor at a time).
        w = self._dequantize(self._gguf_name(name))
        cfg = self.config
        if self._permuted_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = unpermute_rows(w, cfg.num_attention_heads)
        elif self._permuted_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = unpermute_rows(w, cfg.num_key_value_heads)
        out = torch.from_numpy(np.array(w, copy=True))  # copy: the file is memory-mapped read-only
        return out[slices].contiguous() if slices else out

    def rope_freq_factors(self) -> torch.Tensor | None:
        """Llama-3 GGUFs store the RoPE frequency divisors as a tensor instead of rope_scaling metadata."""
        if "rope_freqs.weight" not in self._tensors:
            return None
        return torch.from_numpy(np.array(self._dequantize("rope_freqs.weight"), copy=True))

    def load_tokenizer(self):
        """transformers converts the GGUF vocabulary (seconds); the converted tokenizer is cached."""
        from transformers import AutoTokenizer

        def convert(out: Path) -> None:
            AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name).save_pretrained(out)

        saved = cached_dir(self.path, "tokenizer", convert)
        if saved is None:
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return AutoTokenizer.from_pretrained(str(saved))
