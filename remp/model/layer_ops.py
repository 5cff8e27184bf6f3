"""The elementwise ops around a decoder layer's matmuls, one interface for two implementations: the fused native
kernels on CPU (remp/kernels/layer_ops.cpp), and torch ops elsewhere (GPU, or no compiler). The torch versions
are also the reference the kernels are tested against."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from remp.kernels import layer_ops as native
from remp.model.attention import write_kv
from remp.model.rope import RotaryEmbedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 (or wider), as Hugging Face does, then scale in the model dtype.
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class TorchOps:
    @staticmethod
    def add_rms_norm(
        residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual += delta (in place; skipped when None), then weight * rms_norm(residual)."""
        if delta is not None:
            residual.add_(delta)
        return rms_norm(residual, weight, eps)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate | up) -> silu(gate) * up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rope_cache(
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_heads: int,
        kv_heads: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Rotates the q and k heads of qkv [T, (q_heads + 2 kv_heads) * D] in place, then writes k and v to
        their cache slots."""
        T, D = qkv.shape[0], k_cache.shape[-1]
        qk_cols = (q_heads + kv_heads) * D
        qk = RotaryEmbedding.rotate(qkv[:, :qk_cols].view(T, -1, D), cos.unsqueeze(1), sin.unsqueeze(1))
        qkv[:, :qk_cols] = qk.view(T, qk_cols)
        k, v = qkv[:, q_heads * D : qk_cols], qkv[:, qk_cols:]
        write_kv(k_cache, v_cache, slots, k.view(T, kv_heads, D), v.view(T, kv_heads, D))


def layer_ops(dtype: torch.dtype, device: torch.device) -> ModuleType | type[TorchOps]:
    return native if native.available(dtype, device) else TorchOps
