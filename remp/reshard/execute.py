"""Worker side of a plan, in the phases both strategies are made of:

- send / receive (`PieceIO.post`): post this worker's part of a list of transfers (send buffers cut from the
  old shard, receive buffers, checkpoint reads); every worker walks the same ordered list, so the messages of
  a pair of workers are posted in the same order on both ends;
- assemble weights (`assemble_weight`): a new tensor from the part this worker keeps and the pieces received;
- assemble KV (`assemble_kv_layer`): a new layer of the paged cache from kept heads and received heads, with
  the blocks in use renamed into the new pool;
- free: drop the old shard's tensors of a phase as soon as the new ones are built.

`stop_the_world` runs them chunk by chunk in the pause (extra memory: about one chunk plus new KV layers);
live.py runs the weight phases in the background and only the KV phases in the pause.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from remp.kv_cache import new_kv_layer
from remp.messages import KVFlows, SwitchStats
from remp.model.checkpoint import CheckpointReader
from remp.model.schema import read_range, tensor
from remp.planner.plan import CHECKPOINT, KVPiece, Piece, Plan, Transfer, WeightPiece, weight_ranges
from remp.shard_state import ShardState
from remp.sharding import ShardSpec


class Memory:
    """Bytes allocated beyond the worker's starting footprint, and their peak."""

    def __init__(self, stats: SwitchStats):
        self.stats, self.extra = stats, 0

    def grow(self, t: torch.Tensor) -> torch.Tensor:
        self.extra += nbytes(t)
        self.stats.peak_extra_bytes = max(self.stats.peak_extra_bytes, self.extra)
        return t

    def release(self, t: torch.Tensor) -> None:
        self.extra -= nbytes(t)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def narrow(config, name: str, t: torch.Tensor, lo: int, hi: int, start: int) -> torch.Tensor:
    """The part [lo, hi) (along the tensor's shard axis) of `t`, which holds the range starting at `start`."""
    return t.narrow(tensor(config, name).axis, lo - start, hi - lo)


class PieceIO:
    """Send and receive pieces for one worker: buffers cut from its old shard, buffers for what arrives."""

    def __init__(
        self,
        rank: int,
        config,
        old: ShardState,
        flows: KVFlows,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        group,
        stats: SwitchStats,
        memory: Memory,
        reader: CheckpointReader | None = None,
        old_replica: int | None = 0,
        new_replica: int | None = 0,
    ):
        """old_replica / new_replica: this worker's replica before and after (None: idle there)."""
        self.rank, self.config, self.old, self.group = rank, config, old, group
        self.block_size, self.dtype, self.device, self.reader = block_size, dtype, device, reader
        self.stats, self.memory = stats, memory
        self.old_replica, self.new_replica = old_replica, new_replica
        self.old_ranges = weight_ranges(config, old.spec)
        self.old_heads = old.spec.kv_heads if old.spec else range(0)
        self.use_flows(flows)

    def use_flows(self, flows: KVFlows) -> None:
        """The KV blocks that move on each route (old replica, new replica): their ids in the old replica's pool
        and in the new one's (known only at the cut-over in live mode). KV pieces carry those blocks' slices."""
        self.flows = {
            route: (self._ids(old), self._ids(new)) for route, (old, new) in flows.items() if old
        }  # fmt: skip

    def _ids(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long, device=self.device)

    def carries(self, p: Piece) -> bool:
        """Whether a piece has anything to move: a KV piece only if its route has blocks now."""
        return not isinstance(p, KVPiece) or (p.src, p.dst) in self.flows

    def shape(self, p: Piece) -> list[int]:
        if isinstance(p, KVPiece):  # k and v of the route's blocks, for one layer and head
            return [2, len(self.flows[(p.src, p.dst)][0]), self.block_size, self.config.head_dim]
        t = tensor(self.config, p.name)
        shape = list(t.shape)
        shape[t.axis] = p.stop - p.start
        return shape

    def piece_bytes(self, p: Piece) -> int:
        return math.prod(self.shape(p)) * self.dtype.itemsize if self.carries(p) else 0

    def send_buffer(self, p: Piece) -> torch.Tensor:
        if isinstance(p, KVPiece):
            layer = self.old.kv_layers[p.layer]
            return layer[:, p.kv_head - self.old_heads.start].index_select(1, self.flows[(p.src, p.dst)][0])
        lo = self.old_ranges[p.name][0]
        return narrow(self.config, p.name, self.old.weights[p.name], p.start, p.stop, lo).contiguous()

    def prepare(self, transfers: list[Transfer]) -> tuple[list, dict, list[torch.Tensor]]:
        """Everything local about this worker's part of `transfers`, before any message is posted: send buffers
        cut from the old shard, receive buffers, checkpoint reads. Returns (posts, received, sent), where
        received is piece key -> [(piece, buffer)]."""
        posts, received, sent = [], {}, []
        for t in transfers:
            if not self.carries(t.piece):  # every worker skips it alike: the same flows everywhere
                continue
            if t.src == self.rank:
                buf = self.memory.grow(self.send_buffer(t.piece))
                posts.append((dist.isend, buf, t.dst))
                sent.append(buf)
                self.stats.bytes_sent += nbytes(buf)
            elif t.dst == self.rank:
                buf = self.memory.grow(torch.empty(self.shape(t.piece), dtype=self.dtype, device=self.device))
                p = t.piece
                if t.src == CHECKPOINT:
                    if isinstance(p, KVPiece):
                        raise RuntimeError(f"KV of layer {p.layer} head {p.kv_head} has no holder")
                    buf.copy_(read_range(self.reader, p.name, p.start, p.stop).to(self.dtype))
                    self.stats.bytes_from_checkpoint += nbytes(buf)
                else:
                    posts.append((dist.irecv, buf, t.src))
                    self.stats.bytes_received += nbytes(buf)
                received.setdefault(p if isinstance(p, KVPiece) else p.name, []).append((p, buf))
        return posts, received, sent

    def run(self, posts: list) -> None:
        """Post the messages prepared and wait for all of them (in the order every worker shares)."""
        t0 = time.perf_counter()
        works = [op(buf, peer, group=self.group) for op, buf, peer in posts]
        for work in works:
            work.wait()
        self.stats.add_time("transfers", time.perf_counter() - t0)

    def exchange(self, transfers: list[Transfer]) -> tuple[dict, list[torch.Tensor]]:
        posts, received, sent = self.prepare(transfers)
        self.run(posts)
        return received, sent

    def release(self, received: dict, sent: list[torch.Tensor]) -> None:
        for buf in sent + [b for bufs in received.values() for _, b in bufs]:
            self.memory.release(buf)


def assemble_weight(
    io: PieceIO, name: str, lo: int, hi: int, received: list[tuple[WeightPiece, torch.Tensor]]
) -> torch.Tensor:
    """This worker's new range [lo, hi) of tensor `name`: the very old tensor when the range is unchanged,
    else a new one from the overlap with the old range and the received pieces."""
    old_range = io.old_ranges.get(name)
    if old_range == (lo, hi):
        return io.old.weights[name]
    out = io.memory.grow(torch.empty(io.shape(WeightPiece(name, lo, hi)), dtype=io.dtype, device=io.device))
    if old_range is not None:
        olo, ohi = max(lo, old_range[0]), min(hi, old_range[1])
        if olo < ohi:
            narrow(io.config, name, out, olo, ohi, lo).copy_(
                narrow(io.config, name, io.old.weights[name], olo, ohi, old_range[0])
            )
    for p, buf in received:
        narrow(io.config, name, out, p.start, p.stop, lo).copy_(buf)
    return out


def can_keep_kv_layer(io: PieceIO, layer: int, new_heads: range, same_blocks: bool) -> bool:
    return layer in io.old.kv_layers and io.old_heads == new_heads and same_blocks


def blocks_stay(io: PieceIO, new_num_blocks: int) -> bool:
    """Whether the blocks of this worker's new replica are all its old replica's, each under its old id, in a pool
    of the same size: then its KV layers with the same heads stay as they are."""
    old_num_blocks = next(iter(io.old.kv_layers.values())).shape[2] if io.old.kv_layers else -1
    if io.new_replica is None or old_num_blocks != new_num_blocks:
        return False
    into = {route: ids for route, ids in io.flows.items() if route[1] == io.new_replica}
    own = (io.old_replica, io.new_replica)
    return all(route == own and torch.equal(old, new) for route, (old, new) in into.items())


def assemble_kv_layer(io: PieceIO, layer: int, new_heads: range, target: torch.Tensor, received: dict) -> torch.Tensor:
    """Fill `target` (the new layer, zeroed) with the blocks each route brings to this worker's new replica: kept
    heads of its own old replica's blocks from the old layer, the rest from what was received, each block under
    its new id."""
    old_layer = io.old.kv_layers.get(layer)
    for (src_replica, dst_replica), (old_ids, new_ids) in io.flows.items():
        if dst_replica != io.new_replica:
            continue
        for i, h in enumerate(new_heads):
            if old_layer is not None and h in io.old_heads and src_replica == io.old_replica:
                src = old_layer[:, h - io.old_heads.start].index_select(1, old_ids)
            else:
                src = received[KVPiece(layer, h, src_replica, dst_replica)][0][1]
            target[:, i].index_copy_(1, new_ids, src)
    return target


def phase_groups(plan: Plan, config, piece_bytes, chunk_bytes: int = 64 << 20, weights_only: bool = False):
    """Consecutive phases (-1 = embedding/norm/lm-head, then layers) merged until their transfers reach
    chunk_bytes: few synchronisation points, yet the extra memory stays bounded by about one chunk."""
    per_phase: dict[int, int] = {}
    for t in plan.transfers:
        if not (weights_only and isinstance(t.piece, KVPiece)):
            per_phase[t.piece.layer] = per_phase.get(t.piece.layer, 0) + piece_bytes(t.piece)
    groups, current, size = [], [], 0
    for phase in range(-1, config.num_hidden_layers):
        current.append(phase)
        size += per_phase.get(phase, 0)
        if size >= chunk_bytes:
            groups.append(current)
            current, size = [], 0
    return groups + [current] if current else groups


def stop_the_world(io: PieceIO, plan: Plan, new_spec: ShardSpec | None, new_num_blocks: int) -> ShardState:
    """The whole plan in the pause, chunk by chunk, freeing each old phase as soon as its chunk is done (new_spec
    None: this worker only sends, and ends holding nothing)."""
    config, old = io.config, io.old
    new_ranges = weight_ranges(config, new_spec)
    same_blocks = blocks_stay(io, new_num_blocks)
    new = ShardState(new_spec, {}, {})
    for group in phase_groups(plan, config, io.piece_bytes):
        received, sent = io.exchange([t for t in plan.transfers if t.piece.layer in group])
        for phase in group:
            for name, (lo, hi) in new_ranges.items():
                if WeightPiece(name, lo, hi).layer == phase:
                    new.weights[name] = assemble_weight(io, name, lo, hi, received.get(name, []))
            if new_spec is not None and phase >= 0 and phase in new_spec.layers:
                if can_keep_kv_layer(io, phase, new_spec.kv_heads, same_blocks):
                    new.kv_layers[phase] = old.kv_layers[phase]
                else:
                    target = io.memory.grow(
                        new_kv_layer(
                            len(new_spec.kv_heads), new_num_blocks, io.block_size, config.head_dim, io.dtype, io.device
                        )
                    )
                    new.kv_layers[phase] = assemble_kv_layer(io, phase, new_spec.kv_heads, target, received)
            free_phase(io, phase, new)
        io.release(received, sent)
    return new


def free_phase(io: PieceIO, phase: int, new: ShardState) -> None:
    """Drop the old shard's weights and KV layer of a phase (those the new shard does not keep)."""
    old = io.old
    for name in [n for n in old.weights if WeightPiece(n, 0, 0).layer == phase]:
        t = old.weights.pop(name)
        if new.weights.get(name) is not t:
            io.memory.release(t)
    if phase in old.kv_layers:
        t = old.kv_layers.pop(phase)
        if new.kv_layers.get(phase) is not t:
            io.memory.release(t)
