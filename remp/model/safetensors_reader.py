"""Hugging Face checkpoint directory: config.json, *.safetensors (single or sharded), tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from remp.model.checkpoint import Slices
from remp.model.families import config_from_hf_dir


class SafetensorsReader:
    def __init__(self, path: Path):
        self.path = path
        self.config = config_from_hf_dir(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: path / f for name, f in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{path} has config.json but no *.safetensors files")
            self._file_of = {}
            for f in files:
                with safe_open(f, framework="pt") as sf:
                    self._file_of.update((name, f) for name in sf.keys())
        self._handles: dict[Path, object] = {}

    def _open(self, name: str):
        try:
            f = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.path}") from None
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(name).get_slice(name).get_shape())

    def read(self, name: str, slices: Slices = ()) -> torch.Tensor:
        part = self._open(name).get_slice(name)
        return part[slices] if slices else part[:]

    def rope_freq_factors(self) -> None:
        return None  # HF configs carry rope scaling in config.json

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))
