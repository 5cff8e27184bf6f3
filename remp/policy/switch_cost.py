"""What a switch costs (for the policy, and in simulation), from remp's own planner: the bytes each worker receives
(weights, and KV per block in use) under the minimum-bytes placement, each at the bandwidth of the link it
crosses (`nodes.Links`), plus fixed overheads.

Data-parallel shapes are the engine's `Topology.dp`, planned by the engine's planner: every new replica ends
whole (weights from whichever old worker holds them), and each old replica's running requests, with their KV,
go to the new replicas `kv_routes` allows (those that keep the most of it in place), split evenly."""

from __future__ import annotations

from functools import cache

from remp.config import ModelConfig
from remp.nodes import Links
from remp.planner.mode import Moves, Overheads, SwitchCost, SwitchMode
from remp.planner.plan import CHECKPOINT, KVPiece, PieceSizer, best_placement, kv_routes, make_plan
from remp.topology import Shape, Topology

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
    """Defaults describe an H100 node; the engine's policy passes what it measured on its own machine. `links`:
    the pool's nodes and per-link bandwidths (default: one node at `bandwidth_Bps`)."""

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
        links: Links | None = None,
    ):
        self.config, self.bandwidth, self.block_size, self.links = config, bandwidth_Bps, block_size, links
        self.sizer = PieceSizer(config, itemsize, kv_blocks_used=1, block_size=block_size)
        restart_s = restart_s if restart_s is not None else ENGINE_START_S + self.model_bytes(itemsize) / DISK_BPS
        self.overheads = Overheads(cutover_s, restart_s, precopy_link_share, precopy_slowdown)

    def model_bytes(self, itemsize: int) -> int:
        c = self.config
        layer = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        layer += 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
        heads = 1 if c.tie_word_embeddings else 2
        return (c.num_hidden_layers * layer + heads * c.vocab_size * c.hidden_size) * itemsize

    def _links(self, workers: int) -> Links:
        if self.links is not None:
            if len(self.links.nodes) < workers:
                raise ValueError(f"the links describe {len(self.links.nodes)} workers, the switch needs {workers}")
            return self.links
        return Links((0,) * workers, self.bandwidth, self.bandwidth)

    @cache  # noqa: B019 (one instance per simulation)
    def moves(self, old: Shape, new: Shape) -> Moves:
        """The slowest receiver's seconds of weights, and of KV per block in use, for old -> new."""
        old, new = Shape(*old), Shape(*new)
        links = self._links(max(old.size, new.size))
        before = Topology(old.tp, old.pp, dp=old.dp)
        workers = list(range(max(old.size, new.size)))
        # the planner's placement (replicas interleave over the old shards where that keeps more) and its plan:
        # weights from any old holder, each old replica's KV to the new replicas kv_routes allows
        after = best_placement(self.config, before, new.tp, new.pp, self.sizer, None, True, workers, links, new.dp)
        routes = kv_routes(self.config, before, after)
        # the blocks in use: 1/dp_old on each old replica, split evenly over the new replicas it may go to
        share = {(s, d): 1 / (old.dp * len(ds)) for s, ds in routes.items() for d in ds}
        sizer = self.sizer.with_blocks(dict.fromkeys(share, 1))
        plan = make_plan(self.config, before, after, sizer, with_kv=True, links=links)
        weights: dict[int, float] = {}  # receiver -> seconds
        kv: dict[int, float] = {}  # receiver -> seconds per block in use
        kv_bytes = 0.0
        for t in plan.transfers:
            n = sizer.bytes(t.piece)
            bw = DISK_BPS if t.src == CHECKPOINT else links.bandwidth(t.src, t.dst)
            if isinstance(t.piece, KVPiece):
                f = share[(t.piece.src, t.piece.dst)]
                kv[t.dst] = kv.get(t.dst, 0.0) + n * f / bw
                kv_bytes += n * f
            else:
                weights[t.dst] = weights.get(t.dst, 0.0) + n / bw
        moved_weights = plan.moved.weights + plan.from_checkpoint.weights
        return Moves(max(weights.values(), default=0.0), max(kv.values(), default=0.0), moved_weights, round(kv_bytes))

    def cost(
        self,
        old: Shape,
        new: Shape,
        mode: SwitchMode,
        blocks_in_use: int,
        dirty_blocks: int | None = None,
    ) -> SwitchCost:
        """What switching old -> new in `mode` costs with `blocks_in_use` KV blocks (mode.price says how)."""
        moves = self.moves(Shape(*old), Shape(*new)) if not mode.restarts else Moves(0.0, 0.0, 0, 0)
        return mode.price(moves, blocks_in_use, dirty_blocks, self.overheads)
