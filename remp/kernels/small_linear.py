"""ctypes binding of small_linear.cpp: a linear layer for one to four rows, streaming its weights in place."""

from __future__ import annotations

import ctypes
import functools

import torch

from remp.kernels.build import function, profiled

MAX_ROWS = 4
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGS = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64]


@functools.cache
def _kernel(dtype: torch.dtype):
    return function("small_linear.cpp", "remp_small_linear", dtype, _ARGS, ctypes.c_int)


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _kernel(dtype) is not None


class Segments:
    """The weights a fused linear concatenates ([n_i, K] each, contiguous, one dtype), as the kernel takes them;
    built once per layer. Holds the tensors, so the pointers stay valid."""

    def __init__(self, weights: list[torch.Tensor], bias: torch.Tensor | None):
        if not self.fits(weights, bias):
            raise ValueError("small_linear: contiguous [n, K] CPU weights of one K and dtype (and bias) expected")
        self.weights, self.bias = weights, bias
        self.K, self.N = weights[0].shape[1], sum(w.shape[0] for w in weights)
        self.ptrs = (_PTR * len(weights))(*(w.data_ptr() for w in weights))
        self.rows = (_I64 * len(weights))(*(w.shape[0] for w in weights))

    @staticmethod
    def fits(weights: list[torch.Tensor], bias: torch.Tensor | None) -> bool:
        """Weights (and bias) the kernel reads as they are: contiguous [n, K] rows in one dtype it has."""
        w0 = weights[0]
        return (
            available(w0.dtype, w0.device)
            and all(
                w.dim() == 2 and w.is_contiguous() and w.dtype == w0.dtype and w.device == w0.device for w in weights
            )
            and len({w.shape[1] for w in weights}) == 1
            and (bias is None or (bias.is_contiguous() and bias.dtype == w0.dtype and bias.device == w0.device))
        )


def small_linear(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] (rows may be strided) -> x W^T + bias, [M, N]."""
    M, K = x.shape
    if not (1 <= M <= MAX_ROWS and K == seg.K and x.stride(1) == 1 and x.dtype == seg.weights[0].dtype):
        raise ValueError("small_linear: x must be [1-4, K], rows contiguous, in the weights' dtype")
    out = x.new_empty(M, seg.N)
    with profiled("remp::small_linear"):
        status = _kernel(x.dtype)(
            x.data_ptr(), M, x.stride(0), K, seg.ptrs, seg.rows, len(seg.weights),
            None if seg.bias is None else seg.bias.data_ptr(), out.data_ptr(), seg.N,
        )  # fmt: skip
    if status != 0:
        raise ValueError(f"small_linear: {M} rows are more than it takes")
    return out
