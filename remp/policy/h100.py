"""A performance model of 8x H100 SXM nodes, from the operator and collective timings Vidur measured
(../shared/data/vidur-h100, see its README): per-layer linear, norm, RoPE and activation times by tokens in the
batch and TP degree; NVLink all-reduce and send/recv times by bytes. Attention kernels were not in the data:
attention is modelled from its FLOPs and the KV bytes it reads against the H100's peak figures (gpu.py).

Several nodes (`nodes` > 1, the paper's 2 x 8 setting): each node as a DGX H100, whose 8 GPUs each have their own
400 Gb/s InfiniBand NIC (ConnectX-7): a rail of ~45 GB/s achieved (90% of 50 GB/s) and ~10 us a message (NCCL
over IB). A TP group of 16 has no figures: its layer times are TP8's scaled by the roofline's ratio of TP16 to
TP8 (half the weights and FLOPs, the same launch overhead), its all-reduces hierarchical over the rails."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from remp.config import ModelConfig
from remp.policy.gpu import Fabric, Gpu, GpuModel

# H100 SXM: 80 GB HBM3 at 3.35 TB/s and ~990 TFLOP/s dense bf16 (NVIDIA's datasheet)
H100 = Gpu("h100", 80e9, 3.35e12, 990e12, activation_reserve_bytes=4e9)
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
)
# where the data is: $REMP_H100_DATA, else ../shared/data/vidur-h100 beside this checkout (the project's layout)
DATA_DIR = Path(
    os.environ.get("REMP_H100_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vidur-h100"
)
VIDUR_NAMES = {"llama-2-7b": "Llama-2-7b-hf", "llama-2-70b": "Llama-2-70b-hf"}


def _median_rows(path: Path, key_cols: tuple[str, ...], value: str) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            groups[tuple(int(row[c]) for c in key_cols)].append(float(row[value]))
    return {k: float(np.median(v)) for k, v in groups.items()}


def _alpha_beta(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares latency (s) and s per byte of a collective from ms by size: time = a + b * size."""
    sizes = np.array(sorted(points), dtype=float)
    times = np.array([points[int(s)] for s in sizes])
    a, b = np.linalg.lstsq(np.stack([np.ones_like(sizes), sizes], 1), times, rcond=None)[0]
    return max(float(a), 0.0) / 1e3, max(float(b), 0.0) / 1e3


class H100Model(GpuModel):
    """PerfModel of Llama-2-7B / 70B on `nodes` 8x H100 SXM nodes (NVLink inside, InfiniBand between), bf16."""

    def __init__(self, config: ModelConfig, model: str, data_dir: str | Path | None = None, nodes: int = 1):
        data_dir = Path(data_dir) if data_dir else DATA_DIR
        if model not in VIDUR_NAMES:
            raise ValueError(f"the H100 figures cover {', '.join(VIDUR_NAMES)}, not {model!r}")
        if not data_dir.is_dir():
            raise ValueError(
                f"the H100 figures are not at {data_dir} (Vidur's profiling data: give --h100-data or REMP_H100_DATA)"
            )
        compute = data_dir / "compute" / VIDUR_NAMES[model] / "mlp.csv"
        keys = ("num_tensor_parallel_workers", "num_tokens")
        per_op = {op: _median_rows(compute, keys, f"time_stats.{op}.median") for op in (*LAYER_OPS, "add", "emb")}
        self._tokens: dict[int, np.ndarray] = {}
        self._layer_ms: dict[int, np.ndarray] = {}
        self._emb_ms: dict[int, np.ndarray] = {}
        for tp in sorted({k[0] for k in per_op["add"]}):
            tokens = sorted(n for t, n in per_op["add"] if t == tp)
            self._tokens[tp] = np.array(tokens, dtype=float)
            self._layer_ms[tp] = np.array(
                [sum(per_op[op][tp, n] for op in LAYER_OPS) + 2 * per_op["add"][tp, n] for n in tokens]
            )
            self._emb_ms[tp] = np.array([per_op["emb"][tp, n] for n in tokens])
        net = data_dir / "network"
        ar = _median_rows(net / "h100_dgx" / "all_reduce.csv", ("num_workers", "size"), "time_stats.all_reduce.median")
        all_reduce = {w: _alpha_beta({s: t for (n, s), t in ar.items() if n == w}) for w in sorted({n for n, _ in ar})}
        sr = _median_rows(
            net / "h100_pairwise_nvlink" / "send_recv.csv", ("devices_per_node", "size"), "time_stats.send_recv.median"
        )
        send = _alpha_beta({s: t for (d, s), t in sr.items() if d == 2})  # both GPUs in one node
        name = f"h100:{model}" if nodes == 1 else f"{nodes}x8 h100:{model}"
        super().__init__(name, config, H100, Fabric(8, all_reduce, send), nodes, self._measured_layer_s, self._emb_s)

    @property
    def p2p_bandwidth_Bps(self) -> float:
        """Point-to-point NVLink bandwidth (from the send/recv fit), for switch costs."""
        return 1 / self.fabric.send[1]

    def _interp(self, table: dict[int, np.ndarray], tp: int, tokens: int) -> float:
        x, y = self._tokens[tp], table[tp]
        if tokens <= x[-1]:
            return float(np.interp(tokens, x, y))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])  # past the profile: linear in tokens (compute-bound)
        return float(y[-1] + slope * (tokens - x[-1]))

    def _measured_layer_s(self, tp: int, tokens: int) -> float:
        if tp in self._layer_ms:
            return self._interp(self._layer_ms, tp, tokens) / 1e3
        widest = max(self._layer_ms)
        if tp < widest:
            raise ValueError(f"the H100 figures cover TP {sorted(self._layer_ms)}, not TP{tp}")
        scale = self.roofline_layer_s(tp, tokens) / self.roofline_layer_s(widest, tokens)
        return self._interp(self._layer_ms, widest, tokens) / 1e3 * scale

    def _emb_s(self, tp: int, tokens: int) -> float:
        return self._interp(self._emb_ms, min(tp, max(self._emb_ms)), tokens) / 1e3
