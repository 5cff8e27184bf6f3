"""ctypes binding of sampling.cpp: greedy or temperature sampling, with the chosen token's logprob and rank."""

from __future__ import annotations

import ctypes
import functools

import torch

from remp.kernels.build import function, profiled

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _kernel(dtype: torch.dtype):  # float32 and float64 only: the sampler widens half-precision logits first
    return function("sampling.cpp", "remp_sample", dtype, [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR])


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and _kernel(dtype) is not None


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (float32/64); temperature, uniform: [B] float64 (temperature below 1e-5: greedy) ->
    (token ids [B], their raw log_softmax [B] float64, their 1-based rank in the raw distribution [B])."""
    if not all(t.is_contiguous() for t in (logits, temperature, uniform)) or not (
        temperature.dtype == uniform.dtype == torch.float64
    ):
        raise ValueError("sample: contiguous logits, and contiguous float64 temperature and uniform expected")
    B, V = logits.shape
    if V == 0 or temperature.shape != (B,) or uniform.shape != (B,) or _kernel(logits.dtype) is None:
        raise ValueError("sample: float32/64 logits [B, V > 0], with temperature and uniform [B], expected")
    token, rank = (torch.empty(B, dtype=torch.int64) for _ in range(2))
    logprob = torch.empty(B, dtype=torch.float64)
    with profiled("remp::sample"):
        _kernel(logits.dtype)(
            logits.data_ptr(), B, V, temperature.data_ptr(), uniform.data_ptr(),
            token.data_ptr(), logprob.data_ptr(), rank.data_ptr(),
        )  # fmt: skip
    return token, logprob, rank
