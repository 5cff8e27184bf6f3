"""ctypes bindings of layer_ops.cpp: the fused elementwise ops around a decoder layer's matmuls."""

from __future__ import annotations

import ctypes
import functools

import torch

from remp.kernels.build import function, profiled

_I64, _PTR, _F64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_ARGS = {  # name: (argument types, result type)
    "add_rms_norm": ([_PTR, _PTR, _PTR, _PTR, _I64, _I64, _F64], None),
    "silu_mul": ([_PTR, _I64, _PTR, _I64, _I64], None),
    "rope_cache": ([_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR], ctypes.c_int),
}


@functools.cache
def _kernels(dtype: torch.dtype) -> dict | None:
    fns = {name: function("layer_ops.cpp", f"remp_{name}", dtype, *sig) for name, sig in _ARGS.items()}
    return fns if all(fns.values()) else None


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and _kernels(dtype) is not None


def _rows_contiguous(*ts: torch.Tensor) -> None:
    if not all(t.stride(-1) == 1 for t in ts):
        raise ValueError("layer_ops: the last dimension must be contiguous")


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta (in place; skipped when None), then weight * rms_norm(residual). [T, H], contiguous."""
    if not residual.is_contiguous() or residual.dim() != 2 or weight.shape != residual.shape[1:]:
        raise ValueError("add_rms_norm: a contiguous [T, H] residual and an [H] weight expected")
    if delta is not None and (not delta.is_contiguous() or delta.shape != residual.shape):
        raise ValueError("add_rms_norm: delta must be contiguous and shaped as the residual")
    if (
        not weight.is_contiguous()
        or weight.dtype != residual.dtype
        or (delta is not None and delta.dtype != weight.dtype)
    ):
        raise ValueError("add_rms_norm: residual, delta and weight must share a dtype")
    out = torch.empty_like(residual)
    T, H = residual.shape
    with profiled("remp::add_rms_norm"):
        _kernels(residual.dtype)["add_rms_norm"](
            residual.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            T,
            H,
            eps,
        )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""
    _rows_contiguous(gate_up)
    T, I2 = gate_up.shape
    if I2 % 2:
        raise ValueError("silu_mul: gate | up must have an even width")
    out = gate_up.new_empty(T, I2 // 2)
    with profiled("remp::silu_mul"):
        _kernels(gate_up.dtype)["silu_mul"](gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), T, I2 // 2)
    return out


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
    """Rotates the q and k heads of qkv [T, (q_heads + 2 kv_heads) * D] in place (cos, sin: [T, D] for each
    token's position), then writes k and v to their slots of the caches [kv_heads, blocks, block_size, D]."""
    _rows_contiguous(qkv)
    T, D = qkv.shape[0], k_cache.shape[-1]
    if not (
        qkv.shape[1] == (q_heads + 2 * kv_heads) * D
        and cos.shape == sin.shape == (T, D)
        and all(t.is_contiguous() for t in (cos, sin, k_cache, v_cache))
        and k_cache.shape == v_cache.shape
        and k_cache.shape[0] == kv_heads
        and qkv.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype
        and slots.dtype == torch.int64
        and slots.shape == (T,)
        and slots.is_contiguous()
    ):
        raise ValueError("rope_cache: unexpected shapes, layouts or dtypes")
    with profiled("remp::rope_cache"):
        status = _kernels(qkv.dtype)["rope_cache"](
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), T, q_heads, kv_heads, D,
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), slots.data_ptr(),
        )  # fmt: skip
    if status != 0:
        raise ValueError("rope_cache: a slot lies outside the cache")
