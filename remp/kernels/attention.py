"""ctypes binding of paged_attention.cpp: attention of query rows over the paged cache, read in place."""

from __future__ import annotations

import ctypes
import functools

import torch

from remp.kernels.build import function, profiled

_I64, _PTR, _F64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_ARGS = [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR] + [_I64] * 7 + [_F64]


@functools.cache
def _kernel(dtype: torch.dtype):
    return function("paged_attention.cpp", "remp_paged_attention", dtype, _ARGS, ctypes.c_int)


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and _kernel(dtype) is not None


def paged_attention_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    qlens: torch.Tensor,
    ctxs: torch.Tensor,
    tables: torch.Tensor,
) -> None:
    """Writes the attention of sequence b's query rows q[starts[b] : starts[b] + qlens[b]] into the same rows of
    `out`. Query i of a sequence sits at position ctxs[b] - qlens[b] + i and sees the keys up to it.
    q: [T, kv_heads, group, D] (rows may be strided); out: [T, kv_heads * group * D] (rows may be strided);
    caches: [kv_heads, num_blocks, block_size, D], with this step's keys already written; tables: [B, n] int64."""
    T, kvh, group, D = q.shape
    bs = k_cache.shape[2]
    if not (
        q.stride()[1:] == (group * D, D, 1)
        and out.shape == (T, kvh * group * D)
        and out.stride(1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k_cache.shape == v_cache.shape == (kvh, k_cache.shape[1], bs, D)
        and q.dtype == out.dtype == k_cache.dtype == v_cache.dtype
        and tables.dim() == 2
        and all(t.dtype == torch.int64 and t.is_contiguous() for t in (starts, qlens, ctxs, tables))
        and starts.numel() == qlens.numel() == ctxs.numel() == tables.shape[0]
    ):
        raise ValueError("paged_attention_into: unexpected shapes, layouts or dtypes")
    with profiled("remp::paged_attention"):
        status = _kernel(q.dtype)(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
            out.data_ptr(), out.stride(0), T, starts.data_ptr(), qlens.data_ptr(), ctxs.data_ptr(),
            tables.data_ptr(), tables.shape[1], starts.numel(), kvh, group, D, bs, k_cache.shape[1], D**-0.5,
        )  # fmt: skip
    if status != 0:
        raise ValueError("paged_attention_into: a sequence's rows, context or blocks lie outside the batch or cache")
