"""What this machine's CPU computes natively, read once: it decides the default dtype and the bf16 kernels.

The machines remp runs on differ (Intel with AVX512-BF16/AMX, AMD EPYC with AVX2+FMA only), so nothing here
assumes an instruction set. `REMP_DISABLE_NATIVE_BF16=1` makes the CPU count as one without bf16 support
(for tests of that path on any machine, or to step around a oneDNN problem).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

# Native bf16 arithmetic: dot products in bf16 (AVX512-BF16, AMX) or bf16<->fp32 conversion (AVX-NE-CONVERT);
# arm64 reports "bf16". Without one of these, bf16 matmuls are emulated and several times slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")
# oneDNN's bf16 weight packing refuses to run without these (it raises at _reorder_linear_weight).
ONEDNN_BF16_ALL_OF = ("avx512bw", "avx512vl", "avx512dq")


@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    flags: frozenset[str]
    bf16_disabled: bool = False  # REMP_DISABLE_NATIVE_BF16

    @property
    def native_bf16(self) -> bool:
        return not self.bf16_disabled and any(f in self.flags for f in NATIVE_BF16_FLAGS)

    @property
    def onednn_bf16(self) -> bool:
        """oneDNN can pack and run bf16 linears here (x86 only)."""
        if (
            self.bf16_disabled
            or platform.machine() not in ("x86_64", "AMD64")
            or not torch.backends.mkldnn.is_available()
        ):
            return False
        return "avx_ne_convert" in self.flags or all(f in self.flags for f in ONEDNN_BF16_ALL_OF)

    @property
    def onednn_fp32(self) -> bool:
        """oneDNN runs fp32 linears from pre-packed weights here, faster than plain matmuls (x86 with AVX2)."""
        return (
            platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available() and "avx2" in self.flags
        )

    def describe(self) -> str:
        """One line for logs and benchmark records: the CPU and the flags that matter for our kernels."""
        shown = [
            f
            for f in ("avx2", "fma", "avx512f", *ONEDNN_BF16_ALL_OF, *NATIVE_BF16_FLAGS, "amx_tile")
            if f in self.flags
        ]
        extra = ", bf16 disabled by REMP_DISABLE_NATIVE_BF16" if self.bf16_disabled else ""
        return f"{self.model_name} [{' '.join(shown) or 'no SIMD flags read'}{extra}]"


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name or platform.machine(), frozenset(flags)


@functools.cache
def cpu_features() -> CpuFeatures:
    name, flags = _read_cpuinfo()
    return CpuFeatures(name, flags, os.environ.get("REMP_DISABLE_NATIVE_BF16", "") not in ("", "0"))
