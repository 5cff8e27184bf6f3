"""The checkpoint reader interface: named tensors (Hugging Face names, whatever the file format), read whole or by
slice, the config, RoPE factors and the tokenizer. The formats implement it (safetensors_reader.py,
gguf_reader.py); reader.py opens the right one for a path."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from remp.config import ModelConfig

Slices = tuple[slice, ...]


class CheckpointReader(Protocol):
    path: Path
    config: ModelConfig

    def names(self) -> list[str]: ...

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, slices: Slices = ()) -> torch.Tensor:
        """The tensor (or `tensor[slices]`), in the dtype stored (quantized data comes back as float32)."""
        ...

    def rope_freq_factors(self) -> torch.Tensor | None:
        """Per-frequency RoPE divisors stored as a tensor (Llama-3 GGUF), else None."""
        ...

    def load_tokenizer(self): ...
