"""A performance model of one 8x H100 SXM node, from the operator and collective timings Vidur measured
(../shared/data/vidur-h100, see its README): per-layer linear, norm, RoPE and activation times by tokens in the
batch and TP degree; NVLink all-reduce and send/recv times by bytes. Attention kernels were not in the data:
attention is modelled from its FLOPs and the KV bytes it reads against the H100's peak figures."""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from remp.config import ModelConfig
from remp.policy.perf_model import Batch

# H100 SXM: 3.35 TB/s HBM3 and ~990 TFLOP/s dense bf16 (NVIDIA's datasheet); achieved fractions as FlashAttention
# reaches them on long contexts (about 70% of bandwidth in decode, 50% of peak in prefill).
HBM_BPS = 3.35e12 * 0.7
PEAK_FLOPS = 990e12 * 0.5
GPU_MEMORY_BYTES = 80e9
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
ACTIVATION_RESERVE_BYTES = 4e9  # activations and the allocator's slack at an 8k-token step (vLLM profiles it)
# Host work per micro-batch (scheduling, input preparation, launches): an engine with CUDA graphs spends about a
# millisecond; the same for every topology, so it shifts but does not reorder them.
STEP_OVERHEAD_S = 1e-3
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
BYTES = 2  # bf16 weights, activations and KV
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
    """Least-squares latency (ms) and ms per byte of a collective: time = a + b * size."""
    sizes = np.array(sorted(points), dtype=float)
    times = np.array([points[int(s)] for s in sizes])
    a, b = np.linalg.lstsq(np.stack([np.ones_like(sizes), sizes], 1), times, rcond=None)[0]
    return max(float(a), 0.0), max(float(b), 0.0)


class H100Model:
    """PerfModel of Llama-2-7B / 70B on an 8x H100 SXM node (NVLink), bf16."""

    def __init__(self, config: ModelConfig, model: str, data_dir: str | Path | None = None):
        data_dir = Path(data_dir) if data_dir else DATA_DIR
        if model not in VIDUR_NAMES:
            raise ValueError(f"the H100 figures cover {', '.join(VIDUR_NAMES)}, not {model!r}")
        if not data_dir.is_dir():
            raise ValueError(
                f"the H100 figures are not at {data_dir} (Vidur's profiling data: give --h100-data or REMP_H100_DATA)"
            )
        self.name = f"h100:{model}"
        self.config = config
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
        self._all_reduce = {
            w: _alpha_beta({s: t for (n, s), t in ar.items() if n == w}) for w in sorted({n for n, _ in ar})
        }
        sr = _median_rows(
            net / "h100_pairwise_nvlink" / "send_recv.csv", ("devices_per_node", "size"), "time_stats.send_recv.median"
        )
        self._send_recv = _alpha_beta({s: t for (d, s), t in sr.items() if d == 2})  # both GPUs in one node

    @property
    def p2p_bandwidth_Bps(self) -> float:
        """Point-to-point NVLink bandwidth (from the send/recv fit), for switch costs."""
        return 1e3 / self._send_recv[1]

    def _interp(self, table: dict[int, np.ndarray], tp: int, tokens: int) -> float:
        if tp not in table:
            raise ValueError(f"the H100 figures cover TP {sorted(table)}, not TP{tp}")
        x, y = self._tokens[tp], table[tp]
        if tokens <= x[-1]:
            return float(np.interp(tokens, x, y))
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])  # past the profile: linear in tokens (compute-bound)
        return float(y[-1] + slope * (tokens - x[-1]))

    def _all_reduce_ms(self, tp: int, nbytes: int) -> float:
        if tp == 1:
            return 0.0
        a, b = self._all_reduce[tp]
        return a + b * nbytes

    def _attention_s(self, tp: int, batch: Batch) -> float:
        c = self.config
        heads = math.ceil(c.num_attention_heads / tp)
        kv_heads = math.ceil(c.num_key_value_heads / tp)
        flops = 4 * batch.attn_pairs * heads * c.head_dim
        nbytes = batch.kv_tokens * 2 * kv_heads * c.head_dim * BYTES
        return max(flops / PEAK_FLOPS, nbytes / HBM_BPS)

    def _lm_head_s(self, tp: int, batch: Batch) -> float:
        c = self.config
        # the last stage's TP ranks each hold a slice of the vocabulary; the sampler gathers the logits, which
        # is priced as an all-reduce of them (an upper bound: a gather moves about half as much)
        rows = math.ceil(c.vocab_size / tp)
        gather_s = self._all_reduce_ms(tp, batch.sampled * c.vocab_size * 4) / 1e3 if tp > 1 else 0.0
        return (
            max(rows * c.hidden_size * BYTES / HBM_BPS, 2 * batch.sampled * c.hidden_size * rows / PEAK_FLOPS)
            + gather_s
        )

    def stage_s(self, tp: int, pp: int, batch: Batch) -> float:
        if batch.tokens == 0:
            return 0.0
        c = self.config
        layers = math.ceil(c.num_hidden_layers / pp)
        act_bytes = batch.tokens * c.hidden_size * BYTES
        layer_s = (
            self._interp(self._layer_ms, tp, batch.tokens) + 2 * self._all_reduce_ms(tp, act_bytes)
        ) / 1e3 + self._attention_s(tp, batch)
        edges = self._lm_head_s(tp, batch) + (self._interp(self._emb_ms, tp, batch.tokens) / 1e3 if pp == 1 else 0.0)
        return layers * layer_s + edges + STEP_OVERHEAD_S

    def hop_s(self, tp: int, batch: Batch) -> float:
        a, b = self._send_recv
        return (a + b * batch.tokens * self.config.hidden_size * BYTES) / 1e3

    def busy_factor(self, tp: int, pp: int, active: int) -> float:
        return 1.0  # a GPU per worker

    def weight_bytes_per_gpu(self, tp: int, pp: int) -> float:
        """The largest shard: a stage's layers and the embedding (whole on the first stage), with the lm-head's
        vocabulary slice where it is a tensor of its own on that stage (untied, one stage). A later stage's
        lm-head slice is smaller than the first stage's embedding."""
        c = self.config
        kv_heads = math.ceil(c.num_key_value_heads / tp)
        attn = c.hidden_size * c.head_dim * (math.ceil(c.num_attention_heads / tp) * 2 + kv_heads * 2)
        mlp = 3 * c.hidden_size * math.ceil(c.intermediate_size / tp)
        layer = attn + mlp + 2 * c.hidden_size
        head = c.vocab_size * c.hidden_size * (1 if pp > 1 or c.tie_word_embeddings else 1 + 1 / tp)
        return (math.ceil(c.num_hidden_layers / pp) * layer + head) * BYTES

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        c = self.config
        free = GPU_MEMORY_BYTES * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES - self.weight_bytes_per_gpu(tp, pp)
        per_token = 2 * math.ceil(c.num_hidden_layers / pp) * math.ceil(c.num_key_value_heads / tp) * c.head_dim * BYTES
        return max(0, int(free // per_token))
