"""What a switch costs (for the policy, and in simulation), from remp's own planner: the bytes each worker receives (weights, and KV
per block in use) under the minimum-bytes placement, over the link's bandwidth, plus fixed overheads."""

from __future__ import annotations

from functools import cache

from remp.config import ModelConfig
from remp.planner.mode import Moves, Overheads, SwitchCost, SwitchMode
from remp.planner.plan import KVPiece, PieceSizer, best_placement, make_plan
from remp.topology import Topology

# The cut-over's fixed part: drain the pipeline, swap process groups and block tables (remp measures ~20 ms of
# it on CPU workers; a GPU adds a stream sync and a NCCL communicator already made in the prepare phase).
CUTOVER_S = 0.05
# A live pre-copy gives half the link to the copy, so serving's own collectives keep the rest; the copy engines
# and HBM traffic slow serving kernels a little (the throttle keeps it under remp's 30% bound on CPU).
PRECOPY_LINK_SHARE = 0.5
PRECOPY_SLOWDOWN = 0.05
# A restart: load the checkpoint (local NVMe, ~5 GB/s) and start the engine (NCCL init, memory profiling, CUDA
# graph capture: ~20 s for vLLM on 8 GPUs, its own startup logs); every running request recomputes its KV.
DISK_BPS = 5e9
ENGINE_START_S = 20.0


class SwitchCostModel:
    """Defaults describe an H100 node; the engine's policy passes what it measured on its own machine."""

    def __init__(
        self,
        config: ModelConfig,
        bandwidth_Bps: float,
        block_size: int,
        itemsize: int = 2,
        cutover_s: float = CUTOVER_S,
        precopy_link_share: float = PRECOPY_LINK_SHARE,
        precopy_slowdown: float = PRECOPY_SLOWDOWN,
        restart_s: float | None = None,
    ):
        self.config, self.bandwidth, self.block_size = config, bandwidth_Bps, block_size
        self.sizer = PieceSizer(config, itemsize, kv_blocks_used=1, block_size=block_size)
        restart_s = restart_s if restart_s is not None else ENGINE_START_S + self.model_bytes(itemsize) / DISK_BPS
        self.overheads = Overheads(cutover_s, restart_s, precopy_link_share, precopy_slowdown)

    def model_bytes(self, itemsize: int) -> int:
        c = self.config
        layer = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        layer += 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
        heads = 1 if c.tie_word_embeddings else 2
        return (c.num_hidden_layers * layer + heads * c.vocab_size * c.hidden_size) * itemsize

    @cache  # noqa: B019 (one instance per simulation)
    def moves(self, old: tuple[int, int], new: tuple[int, int]) -> Moves:
        src = Topology(*old)
        placed = best_placement(
            self.config, src, *new, self.sizer, with_kv=True, workers=list(range(max(src.size, new[0] * new[1])))
        )
        plan = make_plan(self.config, src, placed, self.sizer, with_kv=True)
        weights: dict[int, int] = {}
        kv: dict[int, int] = {}
        for t in plan.transfers:
            into = kv if isinstance(t.piece, KVPiece) else weights
            into[t.dst] = into.get(t.dst, 0) + self.sizer.bytes(t.piece)
        w, k = max(weights.values(), default=0), max(kv.values(), default=0)
        return Moves(w / self.bandwidth, k / self.bandwidth, plan.moved.weights, plan.moved.kv)

    def cost(
        self,
        old: tuple[int, int],
        new: tuple[int, int],
        mode: SwitchMode,
        blocks_in_use: int,
        dirty_blocks: int | None = None,
    ) -> SwitchCost:
        """What switching old -> new in `mode` costs with `blocks_in_use` KV blocks (mode.price says how)."""
        moves = self.moves(old, new) if not mode.restarts else Moves(0.0, 0.0, 0, 0)
        return mode.price(moves, blocks_in_use, dirty_blocks, self.overheads)
