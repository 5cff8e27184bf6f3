"""What a switch costs (for the policy, and in simulation), from remp's own planner: the bytes each worker receives
(weights, and KV per block in use) under the minimum-bytes placement, each at the bandwidth of the link it
crosses (`nodes.Links`), plus fixed overheads.

Data-parallel shapes: the new replicas are placed together (they may interleave over the old shards where that
keeps more bytes), and each is planned on its workers from every old holder (the old replicas all hold the
weights), so each ends whole; the running requests are split evenly over the new replicas, and each replica
receives the KV of the requests it takes from the old replica that ran them (one old replica's KV per plan:
with the same dp, replica i's; otherwise the old replica on most of its workers)."""

from __future__ import annotations

from functools import cache

from remp.config import ModelConfig
from remp.nodes import Links
from remp.planner.mode import Moves, Overheads, SwitchCost, SwitchMode
from remp.planner.plan import CHECKPOINT, KVPiece, PieceSizer, best_placements, make_plan
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


def replicas(shape: Shape) -> list[Topology]:
    """A shape's replicas on the pool's workers in order: replica r on workers r * size .. (r + 1) * size - 1."""
    s = Shape(*shape)
    n = s.tp * s.pp
    return [Topology(s.tp, s.pp, tuple(range(r * n, (r + 1) * n))) for r in range(s.dp)]


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
        olds = replicas(old)
        workers = list(range(max(old.size, new.size)))
        # every new replica placed at once (they may interleave over the old shards), from the old holders
        placed = best_placements(
            self.config,
            olds[0],
            new.tp,
            new.pp,
            new.dp,
            self.sizer,
            with_kv=True,
            workers=workers,
            links=links,
            peers=tuple(olds[1:]),
        )
        weights: dict[int, float] = {}  # receiver -> seconds
        kv: dict[int, float] = {}  # receiver -> seconds for the blocks its replica takes, per block in use
        moved_weights, kv_bytes = 0, 0
        for r, target in enumerate(placed):
            # its requests' KV from the old replica that ran them: the same index with the same dp, else the one
            # on most of its workers
            main = (
                olds[r] if old.dp == new.dp else max(olds, key=lambda o: len(set(o.placement) & set(target.placement)))
            )
            peers = tuple(o for o in olds if o is not main)
            plan = make_plan(self.config, main, target, self.sizer, with_kv=True, links=links, peers=peers)
            for t in plan.transfers:
                n = self.sizer.bytes(t.piece)
                bw = DISK_BPS if t.src == CHECKPOINT else links.bandwidth(t.src, t.dst)
                if isinstance(t.piece, KVPiece):
                    kv[t.dst] = kv.get(t.dst, 0.0) + n / bw / new.dp  # this replica takes 1/dp of the blocks
                    kv_bytes += n
                else:
                    weights[t.dst] = weights.get(t.dst, 0.0) + n / bw
            moved_weights += plan.moved.weights + plan.from_checkpoint.weights
        return Moves(
            max(weights.values(), default=0.0), max(kv.values(), default=0.0), moved_weights, kv_bytes // new.dp
        )

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
