"""ctypes binding of sampling.cpp: greedy or temperature sampling, with the chosen token's logprob and rank; the
allowed-token mask of guided rows; a given token's logprob and rank."""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from remp.kernels.build import function, profiled

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _kernel(dtype: torch.dtype):  # float32 and float64 only: the sampler widens half-precision logits first
    return function("sampling.cpp", "remp_sample", dtype, [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR])


@functools.cache
def _mask_kernel(dtype: torch.dtype):
    return function("sampling.cpp", "remp_apply_bitmask", dtype, [_PTR, _I64, _I64, _PTR, _PTR, _I64])


@functools.cache
def _logprob_kernel(dtype: torch.dtype):
    return function("sampling.cpp", "remp_logprob_rank", dtype, [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR])


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and _kernel(dtype) is not None


def _row_index(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if not logits.is_contiguous() or logits.dim() != 2 or _kernel(logits.dtype) is None:
        raise ValueError("contiguous float32/64 logits [B, V] expected")
    if any(not 0 <= r < logits.shape[0] for r in rows):
        raise ValueError(f"rows {rows} outside the batch of {logits.shape[0]}")
    return torch.tensor(rows, dtype=torch.int64)


def apply_bitmask(logits: torch.Tensor, rows: list[int], masks: np.ndarray) -> None:
    """logits[rows[k]] to -inf where masks[k] ([n, W] int32, bit j of word i: token 32 i + j) does not allow the
    token, and past its width; in place."""
    idx = _row_index(logits, rows)
    masks = np.ascontiguousarray(masks, dtype=np.int32)
    if masks.ndim != 2 or masks.shape[0] != len(rows):
        raise ValueError(f"masks of shape {masks.shape} for {len(rows)} rows")
    with profiled("remp::apply_bitmask"):
        _mask_kernel(logits.dtype)(
            logits.data_ptr(), logits.shape[1], len(rows), idx.data_ptr(), masks.ctypes.data, masks.shape[1]
        )


def logprob_rank(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The log_softmax of tokens[k] in logits[rows[k]] ([n] float64) and its 1-based rank there ([n] int64)."""
    idx = _row_index(logits, rows)
    tok = torch.tensor(tokens, dtype=torch.int64)
    if tok.shape != idx.shape or any(not 0 <= t < logits.shape[1] for t in tokens):
        raise ValueError(f"tokens {tokens} for rows {rows} of a vocabulary of {logits.shape[1]}")
    logprob, rank = torch.empty(len(rows), dtype=torch.float64), torch.empty(len(rows), dtype=torch.int64)
    with profiled("remp::logprob_rank"):
        _logprob_kernel(logits.dtype)(
            logits.data_ptr(), logits.shape[1], len(rows), idx.data_ptr(), tok.data_ptr(),
            logprob.data_ptr(), rank.data_ptr(),
        )  # fmt: skip
    return logprob, rank


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
