"""Model configuration, read from a Hugging Face config.json or from GGUF metadata.

The fields every family shares are read here; a family (model/families/) adds its own (MoE sizes, q/k/v
bias) and picks `architecture`, the name its forward, schema and checkpoint names are found by. config.py
knows no family: `remp.model.families.config_from_hf` / `config_from_gguf` put the two together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from remp.cpu_features import cpu_features
from remp.logger import init_logger

logger = init_logger(__name__)

SUPPORTED_ROPE_SCALING = ("llama3", "linear", "default")


class UnsupportedModelError(ValueError):
    """The checkpoint is readable but its architecture or features are not implemented."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the checkpoint's architecture as a family names it ("llama", "qwen2", "qwen3", "mixtral")
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the MLP; of each expert in a mixture of experts
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    num_experts: int = 0  # experts of each layer's mixture of experts; 0: a dense MLP
    num_experts_per_tok: int = 0  # experts each token is routed to
    rope_scaling: dict[str, Any] | None = None
    torch_dtype: torch.dtype | None = None  # dtype the checkpoint was saved in (None: quantized / unknown)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # tokens each position attends to (None: the whole context)
    # the checkpoint's generation_config.json sampling defaults (vLLM's --generation-config auto applies them)
    generation_defaults: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in SUPPORTED_ROPE_SCALING:
            raise UnsupportedModelError(
                f"rope scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_SCALING)})"
            )
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and the number of experts "
                f"({self.num_experts})"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


# generation_config.json fields a request's defaults take (as vLLM's --generation-config auto); max_new_tokens
# becomes max_tokens
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def hf_fields(cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ModelConfig fields every family reads alike from a config.json (all but `architecture`)."""
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedModelError(
            f"the checkpoint is quantized ({method}, config.json's quantization_config): remp does not run "
            "quantized safetensors (their weights need their scales); use an unquantized checkpoint or a GGUF file"
        )
    heads = cfg["num_attention_heads"]
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        rope_scaling["rope_type"] = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None:  # transformers 5 nests it under rope_parameters
        rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eos = (generation_config or {}).get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype")
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        torch_dtype=getattr(torch, dtype_name) if isinstance(dtype_name, str) else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        generation_defaults={k: v for k, v in (generation_config or {}).items() if k in GENERATION_DEFAULTS},
    )


def gguf_fields(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The ModelConfig fields every family reads alike from GGUF metadata (keys under `general.architecture`)."""
    p = meta["general.architecture"] + "."
    heads = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    vocab = meta.get(p + "vocab_size") or meta["tokenizer.ggml.vocab_size"]  # the vocabulary's length
    rope_scaling = None
    if meta.get(p + "rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta[p + "rope.scaling.factor"])}
    elif meta.get(p + "rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {meta[p + 'rope.scaling.type']!r} is not supported")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
    return dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta[p + "feed_forward_length"]),
        num_hidden_layers=int(meta[p + "block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(p + "attention.head_count_kv", heads)),
        head_dim=int(meta.get(p + "attention.key_length", hidden // heads)),
        rms_norm_eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get(p + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_scaling=rope_scaling,
        torch_dtype=None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_window=int(meta[p + "attention.sliding_window"]) if meta.get(p + "attention.sliding_window") else None,
        extra={"rope_freqs": "rope_freqs.weight" in tensor_names},
    )


def max_model_len(asked: int | None, config: ModelConfig) -> int:
    """The context an engine serves: `asked`, or the model's own. remp attends to the whole context, which is the
    model's sliding-window attention exactly when the context is no longer than the window: a longer one is
    refused, and without `asked` the context is the window."""
    window = (
        config.sliding_window
        if config.sliding_window and config.sliding_window < config.max_position_embeddings
        else None
    )
    if asked is None:
        if window is not None:
            logger.info("max_model_len %d: the model's sliding window (attention beyond it is not implemented)", window)
        return window or config.max_position_embeddings
    if asked > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {asked} exceeds the model's maximum context ({config.max_position_embeddings})"
        )
    if window is not None and asked > window:
        raise ValueError(
            f"max_model_len {asked} exceeds the model's sliding_window ({window}): remp attends to the whole "
            f"context, which equals the model's windowed attention only up to {window} tokens; use "
            f"--max-model-len {window} or less"
        )
    return asked


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: str = "cpu") -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (one line for the startup log).

    dtype="auto" follows vLLM (the checkpoint's dtype; float32 and quantized checkpoints in 16-bit) except on
    a CPU without native bf16 arithmetic, where bf16 is emulated and slower than float32: there it is float32.
    On CPU, half precision means bfloat16, as in vLLM's CPU backend."""
    cpu = cpu_features()
    if isinstance(dtype, torch.dtype) or dtype != "auto":
        resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(dtype)
        if resolved is None:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
        if resolved == torch.float16 and device == "cpu":
            resolved = torch.bfloat16
        reason = "asked for"
        if resolved == torch.bfloat16 and device == "cpu" and not cpu.native_bf16:
            reason = (
                f"asked for; this CPU has no native bf16 ({cpu.describe()}): bf16 is emulated and will "
                "be slow, float32 is faster here"
            )
    else:
        resolved = config.torch_dtype or torch.float16
        source = f"the checkpoint's {resolved}" if config.torch_dtype else "a quantized checkpoint"
        if resolved == torch.float32:
            resolved = torch.float16
        if device == "cpu" and resolved in (torch.float16, torch.bfloat16):
            if cpu.native_bf16:
                resolved, reason = torch.bfloat16, f"auto: {source} runs in bf16 (native bf16 on {cpu.describe()})"
            else:
                resolved, reason = torch.float32, f"auto: {source} runs in float32 (no native bf16 on {cpu.describe()})"
        else:
            reason = f"auto: {source}"
    if resolved not in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        raise ValueError(f"dtype {resolved} is not supported")
    return resolved, reason
