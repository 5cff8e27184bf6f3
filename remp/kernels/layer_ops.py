"""ctypes bindings of layer_ops.cpp: the fused elementwise ops around a decoder layer's matmuls."""

from __future__ import annotations

import ctypes
import functools

import torch

from remp.kernels.build import load, profiled

_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_I64, _PTR, _F64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_ARGS = {
    "add_rms_norm": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _F64],
    "silu_mul": [_PTR, _I64, _PTR, _I64, _I64],
    "rope_cache": [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR],
}


@functools.cache
def _kernels(dtype: torch.dtype) -> dict | None:
    lib = load("layer_ops.cpp")
    if lib is None or dtype not in _SUFFIX:
        return None
    out = {}
    for name, argtypes in _ARGS.items():
        fn = getattr(lib, f"remp_{name}_{_SUFFIX[dtype]}")
        fn.argtypes, fn.restype = argtypes, None
        out[name] = fn
    return out


def available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and _kernels(dtype) is not None


def _rows_contiguous(*ts: torch.Tensor) -> None:
    if not all(t.stride(-1) == 1 for t in ts):
        raise ValueError("layer_ops: the last dimension must be contiguous")


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += delta (in place; skipped when None), then weight * rms_norm(residual). [T, H], contiguous."""
    if not residual.is_contiguous() or (delta is not None and not delta.is_contiguous()):
        raise ValueError("add_rms_norm: residual and delta must be contiguous")
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
    D = k_cache.shape[-1]
    if not (cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_cache: tables and caches must be contiguous")
    if slots.dtype != torch.int64 or not slots.is_contiguous():
        raise ValueError("rope_cache: slots must be contiguous int64")
    with profiled("remp::rope_cache"):
        _kernels(qkv.dtype)["rope_cache"](
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], q_heads, kv_heads, D,
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), slots.data_ptr(),
        )  # fmt: skip
