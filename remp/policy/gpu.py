"""A performance model of GPU nodes: per-layer times (measured where there are figures, else a roofline of the
GPU's published peaks), collectives over the node's fabric (NVLink or PCIe inside a node, InfiniBand rails between
nodes), attention from its FLOPs and KV bytes, and the KV capacity the weights leave. One GPU per worker; a
replica's workers fill the nodes in order, so a TP group wider than a node spans nodes and a pipeline crosses a
node boundary every `per_node` workers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from remp.config import ModelConfig
from remp.policy.perf_model import Batch

BYTES = 2  # bf16 weights, activations and KV
# achieved fractions of the peaks: FlashAttention and cuBLAS reach about 70% of memory bandwidth in decode and
# 50% of dense peak in prefill (Vidur's H100 linears sit within 10-20% of this roofline, see docs/BENCHMARKS.md)
HBM_EFFICIENCY, FLOPS_EFFICIENCY = 0.7, 0.5
LAYER_OVERHEAD_S = 15e-6  # kernel launches of a layer's ~8 operators (Vidur's TP8 linears at 1 token, less roofline)
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float
    hbm_Bps: float  # peak memory bandwidth
    flops: float  # dense bf16 peak (the accumulation an inference engine uses)
    activation_reserve_bytes: float  # activations and the allocator's slack at an 8k-token step (vLLM profiles it)
    step_overhead_s: float = 1e-3  # host work per micro-batch (scheduling, inputs, launches)

    @property
    def achieved_Bps(self) -> float:
        return self.hbm_Bps * HBM_EFFICIENCY

    @property
    def achieved_flops(self) -> float:
        return self.flops * FLOPS_EFFICIENCY


@dataclass(frozen=True)
class Fabric:
    """How the GPUs talk. Times are alpha (s) + beta (s per byte)."""

    per_node: int  # GPUs in a node
    all_reduce: dict[int, tuple[float, float]]  # TP degree inside a node -> alpha, beta of its all-reduce
    send: tuple[float, float]  # a hand-off between two GPUs of a node
    rail: tuple[float, float] = (10e-6, 1 / 45e9)  # one GPU's inter-node link (its own NIC)

    def all_reduce_s(self, tp: int, nbytes: float) -> float:
        """A TP group's all-reduce; across nodes hierarchical (NCCL's tree/ring over rails): reduce-scatter
        and all-gather inside each node (an intra-node all-reduce's cost), and between them each GPU all-reduces
        its 1/per_node slice with its peers in the other nodes over its own rail."""
        if tp == 1:
            return 0.0
        inside = min(tp, self.per_node)
        a, b = self.all_reduce[inside]
        t = a + b * nbytes
        if tp > self.per_node:
            nodes = tp // self.per_node
            ra, rb = self.rail
            t += 2 * (nodes - 1) * ra + 2 * (nodes - 1) / nodes * nbytes / self.per_node * rb
        return t

    def hop_s(self, tp: int, pp: int, nbytes: float) -> float:
        """The mean of a replica's pp - 1 hand-offs: those across a node boundary go over a rail."""
        if pp == 1:
            return 0.0
        crossing = min(pp - 1, max(0, math.ceil(tp * pp / self.per_node) - 1)) if tp <= self.per_node else pp - 1
        (a, b), (ra, rb) = self.send, self.rail
        inside = (a + b * nbytes) * (pp - 1 - crossing)
        across = (ra + rb * nbytes) * crossing
        return (inside + across) / (pp - 1)

    def bandwidths_Bps(self) -> tuple[float, float]:
        """(inside a node, between nodes) point-to-point, for the planner's per-link prices."""
        return 1 / self.send[1], 1 / self.rail[1]


class GpuModel:
    """PerfModel of `nodes` x `fabric.per_node` GPUs. `layer_s(tp, tokens)`: measured per-layer times (norms,
    linears, RoPE, activation, residual adds) where the caller has them, else the roofline of `gpu`."""

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        gpu: Gpu,
        fabric: Fabric,
        nodes: int = 1,
        layer_s: Callable[[int, int], float] | None = None,
        embed_s: Callable[[int, int], float] | None = None,
    ):
        self.name, self.config, self.gpu, self.fabric, self.nodes = name, config, gpu, fabric, nodes
        self._layer_s = layer_s or self.roofline_layer_s
        self._embed_s = embed_s or (lambda tp, tokens: tokens * config.hidden_size * BYTES / gpu.achieved_Bps)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.fabric.per_node

    def layer_params(self, tp: int) -> float:
        """One layer's linear weights on one GPU of a TP group (parameters)."""
        c = self.config
        heads, kv = math.ceil(c.num_attention_heads / tp), math.ceil(c.num_key_value_heads / tp)
        return c.hidden_size * c.head_dim * (2 * heads + 2 * kv) + 3 * c.hidden_size * math.ceil(
            c.intermediate_size / tp
        )

    def roofline_layer_s(self, tp: int, tokens: int) -> float:
        """A layer's linears at the achieved peaks (weights read once, 2 FLOPs a weight a token), its elementwise
        operators at memory speed (~12 reads and writes of the hidden state a token), and launch overhead."""
        p = self.layer_params(tp)
        linears = max(2 * tokens * p / self.gpu.achieved_flops, p * BYTES / self.gpu.achieved_Bps)
        elementwise = 12 * tokens * self.config.hidden_size * BYTES / self.gpu.achieved_Bps
        return linears + elementwise + LAYER_OVERHEAD_S

    def _attention_s(self, tp: int, batch: Batch) -> float:
        c = self.config
        heads = math.ceil(c.num_attention_heads / tp)
        kv_heads = math.ceil(c.num_key_value_heads / tp)
        flops = 4 * batch.attn_pairs * heads * c.head_dim
        nbytes = batch.kv_tokens * 2 * kv_heads * c.head_dim * BYTES
        return max(flops / self.gpu.achieved_flops, nbytes / self.gpu.achieved_Bps)

    def _lm_head_s(self, tp: int, batch: Batch) -> float:
        c = self.config
        # the last stage's TP ranks each hold a slice of the vocabulary; the sampler gathers the logits, which
        # is priced as an all-reduce of them (an upper bound: a gather moves about half as much)
        rows = math.ceil(c.vocab_size / tp)
        gather_s = self.fabric.all_reduce_s(tp, batch.sampled * c.vocab_size * 4)
        compute = max(
            rows * c.hidden_size * BYTES / self.gpu.achieved_Bps,
            2 * batch.sampled * c.hidden_size * rows / self.gpu.achieved_flops,
        )
        return compute + gather_s

    def stage_s(self, tp: int, pp: int, batch: Batch) -> float:
        if batch.tokens == 0:
            return 0.0
        c = self.config
        layers = math.ceil(c.num_hidden_layers / pp)
        act_bytes = batch.tokens * c.hidden_size * BYTES
        layer_s = (
            self._layer_s(tp, batch.tokens) + 2 * self.fabric.all_reduce_s(tp, act_bytes) + self._attention_s(tp, batch)
        )
        edges = self._lm_head_s(tp, batch) + (self._embed_s(tp, batch.tokens) if pp == 1 else 0.0)
        return layers * layer_s + edges + self.gpu.step_overhead_s

    def hop_s(self, tp: int, pp: int, batch: Batch) -> float:
        return self.fabric.hop_s(tp, pp, batch.tokens * self.config.hidden_size * BYTES)

    def busy_factor(self, tp: int, pp: int, active: int) -> float:
        return 1.0  # a GPU per worker

    def weight_bytes_per_gpu(self, tp: int, pp: int) -> float:
        """The largest shard: a stage's layers and the embedding (whole on the first stage), with the lm-head's
        vocabulary slice where it is a tensor of its own on that stage (untied, one stage). A later stage's
        lm-head slice is smaller than the first stage's embedding."""
        c = self.config
        layer = self.layer_params(tp) + 2 * c.hidden_size
        head = c.vocab_size * c.hidden_size * (1 if pp > 1 or c.tie_word_embeddings else 1 + 1 / tp)
        return (math.ceil(c.num_hidden_layers / pp) * layer + head) * BYTES

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        c, g = self.config, self.gpu
        free = g.memory_bytes * GPU_MEMORY_UTILIZATION - g.activation_reserve_bytes - self.weight_bytes_per_gpu(tp, pp)
        per_token = 2 * math.ceil(c.num_hidden_layers / pp) * math.ceil(c.num_key_value_heads / tp) * c.head_dim * BYTES
        return max(0, int(free // per_token))

    def supports_tp(self, tp: int) -> bool:
        """A TP group inside a node at a degree the fabric's figures cover, or whole nodes of it."""
        if tp <= self.fabric.per_node:
            return tp == 1 or tp in self.fabric.all_reduce
        return tp % self.fabric.per_node == 0 and tp <= self.num_gpus


# RTX 5090 (GeForce Blackwell, GB202): 32 GB GDDR7 at 1792 GB/s; 209.5 TFLOP/s dense FP16/BF16 tensor with FP32
# accumulation (NVIDIA's datasheet; 838 TFLOP/s is sparse with FP16 accumulation). 2 GB of activations at 7B/13B.
RTX_5090 = Gpu("rtx5090", 32e9, 1.792e12, 209.5e12, activation_reserve_bytes=2e9)
# PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b = 63 GB/s a direction. GeForce cards have no peer-to-peer, so NCCL
# stages collectives through host memory (its SHM transport): we assume 25 GB/s of bus bandwidth for a ring
# all-reduce (2 (n - 1) / n bytes a GPU) and 25 us of latency per collective, and 15 us + 25 GB/s per hand-off.
# Assumptions, not measurements: a PCIe box with P2P enabled would do up to ~2x better.
PCIE_BUS_BPS, PCIE_ALPHA_S = 25e9, 25e-6


def pcie_fabric(per_node: int = 8) -> Fabric:
    ring = {n: (PCIE_ALPHA_S, 2 * (n - 1) / n / PCIE_BUS_BPS) for n in (2, 4, 8, 16) if n <= per_node}
    return Fabric(per_node, ring, send=(15e-6, 1 / PCIE_BUS_BPS))


def rtx5090_model(config: ModelConfig, model: str, nodes: int = 1) -> GpuModel:
    """8 RTX 5090-class GPUs on PCIe 5 per node, roofline from the published peaks."""
    return GpuModel(f"{nodes * 8}x rtx5090:{model}", config, RTX_5090, pcie_fabric(), nodes)
