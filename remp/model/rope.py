"""Rotary position embeddings (Hugging Face's rotate-half layout), with Llama-3 and linear scaling."""

from __future__ import annotations

import math

import torch

from remp.config import ModelConfig


def inv_frequencies(
    config: ModelConfig, freq_factors: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.to(dtype)
    return inv_freq


class RotaryEmbedding:
    """cos/sin tables for every position up to max_positions, indexed per token."""

    def __init__(
        self,
        config: ModelConfig,
        max_positions: int,
        dtype: torch.dtype,
        freq_factors: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq = inv_frequencies(config, freq_factors, compute)
        freqs = torch.outer(torch.arange(max_positions, dtype=compute), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token: [tokens, head_dim]; looked up once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim], cos and sin: [tokens, 1, head_dim]; q and k heads come together."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
