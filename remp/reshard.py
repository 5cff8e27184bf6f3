"""Worker-side plan execution: build this worker's new shard (weights and KV slices) from what it keeps, what
peers send and what the checkpoint holds, phase by phase (the embedding/norm/lm-head first, then layer by layer,
consecutive phases merged into chunks of ~64 MB of transfers), freeing each old layer as soon as its chunk is
done, so the extra memory stays around one chunk plus the new KV pool slices.

Every worker walks the same ordered transfer list, so point-to-point messages between a pair of workers are
posted in the same order on both ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from remp.kv_cache import new_kv_layer
from remp.model.reader import CheckpointReader
from remp.plan import CHECKPOINT, KVPiece, Plan, WeightPiece, shard_axis, tensor_shape, weight_ranges
from remp.sharding import ShardSpec


@dataclass
class ShardState:
    """What a worker holds: canonical weights (with the range of each along its shard axis) and KV layers."""

    spec: ShardSpec | None
    weights: dict[str, torch.Tensor]
    kv_layers: dict[int, torch.Tensor]  # global layer -> [2, kv_heads, blocks, block_size, D]


@dataclass
class ReshardStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_from_checkpoint: int = 0
    peak_extra_bytes: int = 0
    seconds: dict = field(default_factory=dict)  # where the time went: groups, transfers, assemble, install


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _phase_groups(plan: Plan, config, piece_bytes, chunk_bytes: int = 64 << 20) -> list[list[int]]:
    """Consecutive phases (-1 = embedding/norm/lm-head, then layers) merged until their transfers reach
    chunk_bytes: few synchronisation points, yet the extra memory stays bounded by about one chunk."""
    per_phase: dict[int, int] = {}
    for t in plan.transfers:
        per_phase[t.piece.layer] = per_phase.get(t.piece.layer, 0) + piece_bytes(t.piece)
    groups, current, size = [], [], 0
    for phase in range(-1, config.num_hidden_layers):
        current.append(phase)
        size += per_phase.get(phase, 0)
        if size >= chunk_bytes:
            groups.append(current)
            current, size = [], 0
    return groups + [current] if current else groups


def execute_plan(
    rank: int,
    plan: Plan,
    config,
    old: ShardState,
    new_spec: ShardSpec,
    used_blocks: list[int],
    new_block_ids: list[int],
    new_num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    reader: CheckpointReader | None = None,
) -> tuple[ShardState, ReshardStats]:
    stats = ReshardStats()
    D = config.head_dim
    old_ranges, new_ranges = weight_ranges(config, old.spec), weight_ranges(config, new_spec)
    old_heads = old.spec.kv_heads if old.spec else range(0)
    new_heads = new_spec.kv_heads
    used = torch.tensor(used_blocks, dtype=torch.long, device=device)
    new_ids = torch.tensor(new_block_ids, dtype=torch.long, device=device)
    same_blocks = (
        used_blocks == new_block_ids and old.kv_layers and next(iter(old.kv_layers.values())).shape[2] == new_num_blocks
    )
    extra = 0  # bytes allocated beyond the starting footprint, now

    def grow(n: int) -> None:
        nonlocal extra
        extra += n
        stats.peak_extra_bytes = max(stats.peak_extra_bytes, extra)

    def weight_view(name: str, lo: int, hi: int, tensor: torch.Tensor, start: int) -> torch.Tensor:
        return tensor.narrow(shard_axis(name), lo - start, hi - lo)

    def piece_shape(p) -> list[int]:
        if isinstance(p, KVPiece):  # k and v of the blocks in use, for one layer and head
            return [2, len(used_blocks), block_size, D]
        shape = list(tensor_shape(config, p.name))
        shape[shard_axis(p.name)] = p.stop - p.start
        return shape

    def piece_buffer(p) -> torch.Tensor:
        return torch.empty(piece_shape(p), dtype=dtype, device=device)

    def piece_bytes(p) -> int:
        return math.prod(piece_shape(p)) * dtype.itemsize

    new = ShardState(new_spec, {}, {})
    for group in _phase_groups(plan, config, piece_bytes):
        transfers = [t for t in plan.transfers if t.piece.layer in group]
        works, sent, received = [], [], {}
        for t in transfers:
            if t.src == rank:
                p = t.piece
                if isinstance(p, KVPiece):
                    buf = old.kv_layers[p.layer][:, p.kv_head - old_heads.start].index_select(1, used).contiguous()
                else:
                    buf = weight_view(p.name, p.start, p.stop, old.weights[p.name], old_ranges[p.name][0]).contiguous()
                grow(_nbytes(buf))
                works.append(dist.isend(buf, dst=t.dst))
                sent.append(buf)
                stats.bytes_sent += _nbytes(buf)
            elif t.dst == rank:
                buf = piece_buffer(t.piece)
                grow(_nbytes(buf))
                if t.src == CHECKPOINT:
                    p = t.piece
                    if isinstance(p, KVPiece):
                        raise RuntimeError(f"KV of layer {p.layer} head {p.kv_head} has no holder")
                    sl = [slice(None)] * buf.dim()
                    sl[shard_axis(p.name)] = slice(p.start, p.stop)
                    buf.copy_(reader.read(p.name, tuple(sl)).to(dtype))
                    stats.bytes_from_checkpoint += _nbytes(buf)
                else:
                    works.append(dist.irecv(buf, src=t.src))
                    stats.bytes_received += _nbytes(buf)
                received.setdefault(t.piece if isinstance(t.piece, KVPiece) else t.piece.name, []).append(
                    (t.piece, buf)
                )
        t_wait = time.perf_counter()
        for work in works:
            work.wait()
        stats.seconds["transfers"] = stats.seconds.get("transfers", 0) + time.perf_counter() - t_wait

        for phase in group:
            # assemble this phase's new weights
            for name, (lo, hi) in new_ranges.items():
                if WeightPiece(name, lo, hi).layer != phase:
                    continue
                if old_ranges.get(name) == (lo, hi):
                    new.weights[name] = old.weights[name]  # unchanged slice: keep the very tensor
                    continue
                t = piece_buffer(WeightPiece(name, lo, hi))
                grow(_nbytes(t))
                if name in old_ranges:
                    olo, ohi = max(lo, old_ranges[name][0]), min(hi, old_ranges[name][1])
                    if olo < ohi:
                        weight_view(name, olo, ohi, t, lo).copy_(
                            weight_view(name, olo, ohi, old.weights[name], old_ranges[name][0])
                        )
                for p, buf in received.get(name, []):
                    weight_view(name, p.start, p.stop, t, lo).copy_(buf)
                new.weights[name] = t
            # assemble this phase's KV layer
            if phase >= 0 and phase in new_spec.layers:
                old_layer = old.kv_layers.get(phase)
                if old_layer is not None and old_heads == new_heads and same_blocks:
                    new.kv_layers[phase] = old_layer
                else:
                    layer = new_kv_layer(len(new_heads), new_num_blocks, block_size, D, dtype, device)
                    grow(_nbytes(layer))
                    for i, h in enumerate(new_heads):
                        if old_layer is not None and h in old_heads:
                            src = old_layer[:, h - old_heads.start].index_select(1, used)
                        else:
                            src = received[KVPiece(phase, h)][0][1]
                        layer[:, i].index_copy_(1, new_ids, src)
                    new.kv_layers[phase] = layer
            # free what the old shard held for this phase
            for name in [n for n in old.weights if WeightPiece(n, 0, 0).layer == phase]:
                t = old.weights.pop(name)
                if new.weights.get(name) is not t:
                    extra -= _nbytes(t)
            if phase in old.kv_layers:
                t = old.kv_layers.pop(phase)
                if new.kv_layers.get(phase) is not t:
                    extra -= _nbytes(t)
        for buf in sent:
            extra -= _nbytes(buf)
        for bufs in received.values():
            for _, buf in bufs:
                extra -= _nbytes(buf)
    return new, stats
