"""The model families remp runs, found by the architecture a checkpoint names: `architectures[0]` of a Hugging Face
config.json, `general.architecture` of a GGUF file. Each family is one file (family.py says what it gives);
anything else is refused with an UnsupportedModelError that lists what is supported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from remp.config import ModelConfig, UnsupportedModelError, gguf_fields, hf_fields
from remp.model.families.family import Family
from remp.model.families.llama import LLAMA
from remp.model.families.mixtral import MIXTRAL
from remp.model.families.qwen3 import QWEN3

_FAMILIES: list[Family] = []


def register(family: Family) -> None:
    """Add a family; the architecture names it answers to must be its own."""
    taken = {a for f in _FAMILIES for a in f.architectures} & set(family.architectures)
    if taken or any(f.name == family.name for f in _FAMILIES):
        raise ValueError(f"family {family.name!r}: {sorted(taken) or 'its name'} is registered already")
    if family.name not in family.architectures.values():
        raise ValueError(f"family {family.name!r} must name one of its architectures after itself")
    _FAMILIES.append(family)


for _family in (LLAMA, QWEN3, MIXTRAL):
    register(_family)


def supported() -> str:
    return ", ".join(a for f in _FAMILIES for a in f.architectures)


def family_of(config: ModelConfig) -> Family:
    for f in _FAMILIES:
        if config.architecture in f.architectures.values():
            return f
    raise UnsupportedModelError(
        f"no model family runs architecture {config.architecture!r}; remp supports {supported()}"
    )


def config_from_hf(cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (and generation_config.json), by its family."""
    archs = cfg.get("architectures") or []
    found = next(((f, f.architectures[a]) for a in archs for f in _FAMILIES if a in f.architectures), None)
    if found is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; remp supports {supported()}"
        )
    family, architecture = found
    return ModelConfig(
        architecture=architecture,
        **{**hf_fields(cfg, generation_config), **family.config_fields(cfg, architecture)},
    )


def config_from_hf_dir(path: Path) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
    gen_path = path / "generation_config.json"
    return config_from_hf(cfg, json.loads(gen_path.read_text()) if gen_path.exists() else None)


def family_for_gguf(meta: dict[str, Any]) -> Family:
    arch = meta.get("general.architecture")
    for f in _FAMILIES:
        if f.gguf is not None and f.gguf.architecture == arch and f.gguf.accepts(meta):
            return f
    known = sorted({f.gguf.architecture for f in _FAMILIES if f.gguf is not None})
    raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; remp reads {', '.join(known)} GGUF files")


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    family = family_for_gguf(meta)
    return ModelConfig(
        architecture=family.name, **{**gguf_fields(meta, tensor_names), **family.gguf.config_fields(meta)}
    )
