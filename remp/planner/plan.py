"""Plans: which pieces every worker must end with under a topology, and where each comes from.

A piece is a weight slice (a range of one checkpoint tensor along its shard axis) or a KV slice (one layer x
one KV head, over every block in use). A plan maps new coordinates onto workers so that the most bytes stay in
place (an assignment problem), then gives every missing piece exactly one source: a peer that holds it under
the old topology (spreading sends over holders) or, where no peer has it, the checkpoint. Pure functions:
no tensors, no processes; the executor in the worker follows the plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from remp.config import ModelConfig
from remp.model.schema import shard_tensors, tensor, tensor_layer
from remp.nodes import Links
from remp.sharding import ShardSpec
from remp.topology import Topology

CHECKPOINT = -1  # source id of pieces read from the checkpoint


@dataclass(frozen=True, order=True)
class WeightPiece:
    name: str
    start: int  # range along the tensor's shard axis (model/schema.py)
    stop: int

    @property
    def layer(self) -> int:
        """Layer index, or -1 for the embedding, final norm and lm-head (moved first)."""
        return tensor_layer(self.name)


@dataclass(frozen=True, order=True)
class KVPiece:
    layer: int
    kv_head: int


Piece = WeightPiece | KVPiece


@dataclass(frozen=True)
class Transfer:
    piece: Piece
    src: int  # worker rank, or CHECKPOINT
    dst: int


@dataclass
class ByteCounts:
    weights: int = 0
    kv: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv

    def add(self, piece: Piece, n: int) -> None:
        if isinstance(piece, KVPiece):
            self.kv += n
        else:
            self.weights += n


@dataclass
class Plan:
    old: Topology | None  # None: cold start from the checkpoint
    new: Topology
    needs: dict[int, list[Piece]]  # worker -> every piece it must hold under `new`
    transfers: list[Transfer]  # sorted by (layer, piece, src, dst): every worker iterates them in this order
    moved: ByteCounts = field(default_factory=ByteCounts)
    kept: ByteCounts = field(default_factory=ByteCounts)
    minimum: ByteCounts = field(default_factory=ByteCounts)  # the least any plan must move (any placement)
    from_checkpoint: ByteCounts = field(default_factory=ByteCounts)


class PieceSizer:
    """Bytes of pieces for one model, dtype and number of KV blocks in use."""

    def __init__(self, config: ModelConfig, itemsize: int, kv_blocks_used: int, block_size: int):
        self.config, self.itemsize = config, itemsize
        self.kv_piece_bytes = 2 * kv_blocks_used * block_size * config.head_dim * itemsize

    def row_bytes(self, name: str) -> int:
        return tensor(self.config, name).rows_per_unit * self.itemsize

    def bytes(self, piece: Piece) -> int:
        if isinstance(piece, KVPiece):
            return self.kv_piece_bytes
        return (piece.stop - piece.start) * self.row_bytes(piece.name)


def weight_ranges(config: ModelConfig, spec: ShardSpec | None) -> dict[str, tuple[int, int]]:
    """Each checkpoint tensor a shard holds, as the range it holds along the tensor's shard axis."""
    return {} if spec is None else shard_tensors(config, spec)


def worker_pieces(config: ModelConfig, topology: Topology, worker: int, with_kv: bool) -> list[Piece]:
    """Every piece a worker holds under a topology (nothing if the topology leaves it idle)."""
    if topology.coordinate(worker) is None:
        return []
    spec = topology.spec(config, worker)
    pieces: list[Piece] = [WeightPiece(name, *r) for name, r in weight_ranges(config, spec).items()]
    if with_kv:
        pieces += [KVPiece(layer, h) for layer in spec.layers for h in spec.kv_heads]
    return pieces


def held_pieces(
    config: ModelConfig, old: Topology, worker: int, with_kv: bool, peers: tuple[Topology, ...] = ()
) -> list[Piece]:
    """What a worker holds before a switch: its pieces under `old`, or, on a worker of one of `peers` (the old
    model's other data-parallel replicas, on workers of their own), that replica's weights. A replica's KV is
    its own requests', so only `old`'s KV counts: a plan moves the KV of one old replica at a time."""
    if worker in old.placement or not peers:
        return worker_pieces(config, old, worker, with_kv)
    peer = next((p for p in peers if worker in p.placement), None)
    return [] if peer is None else worker_pieces(config, peer, worker, with_kv=False)


def kv_only_on(config: ModelConfig, topology: Topology, workers: set[int]) -> set[KVPiece]:
    """KV pieces (layer x KV head) that no worker outside `workers` holds: lost with them. Empty when TP
    replicates every KV head of theirs elsewhere (tp > KV heads)."""

    def kv(w: int) -> set:
        return {p for p in worker_pieces(config, topology, w, True) if isinstance(p, KVPiece)}

    theirs = set().union(*(kv(w) for w in workers if w in topology.placement))
    return theirs - set().union(*(kv(w) for w in topology.placement if w not in workers))


def _index(pieces: list[Piece]) -> tuple[dict[str, tuple[int, int]], set[KVPiece]]:
    weights = {p.name: (p.start, p.stop) for p in pieces if isinstance(p, WeightPiece)}
    return weights, {p for p in pieces if isinstance(p, KVPiece)}


def _overlap(piece: Piece, weights: dict[str, tuple[int, int]], kv: set[KVPiece]) -> tuple[int, int] | None:
    """The part of `piece` (as a range; (0, 1) for a KV piece) that a holder with these pieces has."""
    if isinstance(piece, KVPiece):
        return (0, 1) if piece in kv else None
    held = weights.get(piece.name)
    if held is None:
        return None
    lo, hi = max(piece.start, held[0]), min(piece.stop, held[1])
    return (lo, hi) if lo < hi else None


def _held_bytes(sizer: PieceSizer, piece: Piece, weights: dict[str, tuple[int, int]], kv: set[KVPiece]) -> int:
    """Bytes of `piece` that a holder of these pieces already has."""
    ov = _overlap(piece, weights, kv)
    if ov is None:
        return 0
    return sizer.bytes(piece) if isinstance(piece, KVPiece) else sizer.bytes(WeightPiece(piece.name, *ov))


def best_placement(
    config: ModelConfig,
    old: Topology,
    tp: int,
    pp: int,
    sizer: PieceSizer,
    layers_per_stage: tuple[int, ...] | None = None,
    with_kv: bool = True,
    workers: list[int] | None = None,
    links: Links | None = None,
    peers: tuple[Topology, ...] = (),
) -> Topology:
    """The placement of the new coordinates on the pool's workers (default: old's) that keeps the most bytes in
    place. A pool larger than the topology leaves the workers that would keep the least idle. With `links` (a
    pool on several nodes) each part a worker must receive is priced at the bandwidth of the fastest link to a
    holder of it, and the placement minimises the receivers' total time (a proxy for the slowest one's);
    among placements of equal cost, each TP group stays inside a node and the pipeline crosses nodes.
    `peers`: the old model's other data-parallel replicas (see `held_pieces`)."""
    return best_placements(config, old, tp, pp, 1, sizer, layers_per_stage, with_kv, workers, links, peers)[0]


def best_placements(
    config: ModelConfig,
    old: Topology,
    tp: int,
    pp: int,
    dp: int,
    sizer: PieceSizer,
    layers_per_stage: tuple[int, ...] | None = None,
    with_kv: bool = True,
    workers: list[int] | None = None,
    links: Links | None = None,
    peers: tuple[Topology, ...] = (),
) -> list[Topology]:
    """`dp` replicas of TP tp x PP pp placed together as in best_placement: every replica's coordinates compete
    for the pool's workers in one assignment, so the replicas interleave over the old shards where that keeps
    more (two TP2 replicas after TP4 each take one rank of each old pair). The tie-break fills nodes replica by
    replica, stage by stage."""
    workers = sorted(old.placement if workers is None else workers)
    draft = Topology(tp, pp, tuple(range(tp * pp)), layers_per_stage)
    if dp * draft.size > len(workers):
        raise ValueError(f"{dp} x {draft} needs {dp * draft.size} workers, but the pool has {len(workers)}")
    index = {w: _index(held_pieces(config, old, w, with_kv, peers)) for w in workers}
    homes = links.stage_homes(tp, pp * dp, workers) if links is not None else [None] * pp * dp
    needs = [worker_pieces(config, draft, c, with_kv) for c in range(draft.size)]
    rows = dp * draft.size
    cost = np.zeros((rows, len(workers)))
    for c in range(draft.size):
        for j, w in enumerate(workers):
            if links is None or not links.multi_node:
                missing = float(sum(sizer.bytes(p) - _held_bytes(sizer, p, *index[w]) for p in needs[c]))
            else:
                missing = round(1e9 * _receive_s(sizer, needs[c], w, index, links))  # nanoseconds
            for r in range(dp):
                home = homes[r * pp + c // tp]
                away = home is not None and links.nodes[w] != home
                cost[r * draft.size + c, j] = missing * (rows + 1) + away  # the tie-break never outweighs a byte/ns
    rows_, cols = linear_sum_assignment(cost)
    placement = [0] * rows
    for i, j in zip(rows_, cols):
        placement[i] = workers[j]
    n = draft.size
    return [Topology(tp, pp, tuple(placement[r * n : (r + 1) * n]), layers_per_stage) for r in range(dp)]


def _receive_s(sizer: PieceSizer, need: list[Piece], dst: int, index: dict, links: Links) -> float:
    """Seconds for `dst` to receive what it lacks of `need`, each part over the fastest link to a holder of it
    (the checkpoint counts as local)."""
    total = 0.0
    for piece in need:
        for part, holders in _missing(piece, _overlap(piece, *index[dst]), index):
            total += sizer.bytes(part) / max((links.bandwidth(h, dst) for h in holders), default=links.intra_Bps)
    return total


def _missing(piece: Piece, kept: tuple[int, int] | None, held: dict) -> Iterator[tuple[Piece, list[int]]]:
    """The parts of `piece` that a worker keeping `kept` of it lacks, each with the old holders of that part
    (`held`: worker -> _index of what it holds)."""
    if isinstance(piece, KVPiece):
        if kept is None:
            yield piece, [w for w, h in held.items() if piece in h[1]]
        return
    gaps = [(piece.start, piece.stop)] if kept is None else [(piece.start, kept[0]), (kept[1], piece.stop)]
    for lo, hi in gaps:
        if lo < hi:
            for start, stop, holders in _segments(piece.name, lo, hi, held):
                yield WeightPiece(piece.name, start, stop), holders


def make_plan(
    config: ModelConfig,
    old: Topology | None,
    new: Topology,
    sizer: PieceSizer,
    with_kv: bool = True,
    lost: frozenset[int] = frozenset(),
    links: Links | None = None,
    peers: tuple[Topology, ...] = (),
) -> Plan:
    """Sources for every piece of every worker under `new`. `old` None means cold start (checkpoint);
    workers in `lost` hold nothing any more (their pieces come from survivors or the checkpoint). With `links`,
    a holder on the receiver's node is preferred to one across nodes. `peers`: the old model's other
    data-parallel replicas, whose workers hold its weights too (see `held_pieces`); a new replica is planned
    from them all."""
    workers = sorted(new.placement)
    needs = {w: worker_pieces(config, new, w, with_kv) for w in workers}
    holders = sorted({*old.placement, *(w for p in peers for w in p.placement)}) if old is not None else []
    held = {w: _index(held_pieces(config, old, w, with_kv, peers)) for w in holders if w not in lost}
    plan = Plan(old, new, needs, [])
    load: dict[int, int] = defaultdict(int)  # bytes each holder sends, to spread the sends

    def source(holders: list[int], dst: int) -> int:
        def far(w: int) -> bool:
            return links is not None and links.nodes[w] != links.nodes[dst]

        return min(holders, key=lambda w: (far(w), load[w], w)) if holders else CHECKPOINT

    missing = []
    for dst in workers:
        mine = held.get(dst, ({}, set()))
        for piece in needs[dst]:
            kept = _overlap(piece, *mine)
            if kept is not None:
                part = piece if isinstance(piece, KVPiece) else WeightPiece(piece.name, *kept)
                plan.kept.add(piece, sizer.bytes(part))
            missing += [(part, holders, dst) for part, holders in _missing(piece, kept, held)]
    # pieces with one possible source first, then the rest largest first, each from the least-loaded holder:
    # the choices left for last can even out what the forced ones made unequal
    missing.sort(key=lambda m: (len(m[1]) > 1, -sizer.bytes(m[0])))
    for part, holders, dst in missing:
        _assign(plan, sizer, load, Transfer(part, source(holders, dst), dst))
    plan.transfers.sort(key=lambda t: (t.piece.layer, str(type(t.piece)), t.piece, t.src, t.dst))
    plan.minimum = _minimum(config, old, new, sizer, with_kv, lost, peers)
    return plan


def _assign(plan: Plan, sizer: PieceSizer, load: dict[int, int], t: Transfer) -> None:
    n = sizer.bytes(t.piece)
    plan.transfers.append(t)
    if t.src == CHECKPOINT:
        plan.from_checkpoint.add(t.piece, n)
    else:
        plan.moved.add(t.piece, n)
        load[t.src] += n


def _segments(name: str, lo: int, hi: int, held: dict) -> list[tuple[int, int, list[int]]]:
    """Split [lo, hi) at the old holders' range boundaries: (start, stop, holders of that segment)."""
    cuts = {lo, hi}
    for weights, _ in held.values():
        if name in weights:
            cuts.update(c for c in weights[name] if lo < c < hi)
    bounds = sorted(cuts)
    out = []
    for a, b in zip(bounds, bounds[1:]):
        holders = [
            w for w, (weights, _) in held.items() if name in weights and weights[name][0] <= a and b <= weights[name][1]
        ]
        out.append((a, b, holders))
    return out


def _minimum(
    config: ModelConfig,
    old: Topology | None,
    new: Topology,
    sizer: PieceSizer,
    with_kv: bool,
    lost: frozenset[int],
    peers: tuple[Topology, ...] = (),
) -> ByteCounts:
    """Bytes any plan must bring to workers: what the new shards need minus what the best placement keeps.
    Split by kind at that optimum."""
    out = ByteCounts()
    if old is None:
        return out
    pool = sorted(set(old.placement) | set(new.placement))
    best = (
        best_placement(config, old, new.tp, new.pp, sizer, new.layers_per_stage, with_kv, pool, peers=peers)
        if not lost
        else new
    )
    for w in best.placement:
        held = [] if w in lost else held_pieces(config, old, w, with_kv, peers)
        weights, kv = _index(held)
        for p in worker_pieces(config, best, w, with_kv):
            out.add(p, sizer.bytes(p) - _held_bytes(sizer, p, weights, kv))
    return out


def staging_bytes(
    config: ModelConfig, plan: Plan, sizer: PieceSizer, num_blocks: int, block_size: int, same_blocks: bool
) -> dict[int, int]:
    """Extra bytes each worker holds at the peak of a live switch: the new tensors it assembles (for every
    changed range) and the pieces it receives for them, and the KV layers it cannot keep (other heads, or a
    pool of another size). The old shard serves until the cut-over, so none of this replaces anything yet."""
    kv_head_bytes = 2 * num_blocks * block_size * config.head_dim * sizer.itemsize
    out = {}
    for w in plan.new.placement:
        new_spec = plan.new.spec(config, w)
        old_spec = plan.old.spec(config, w) if plan.old is not None and plan.old.coordinate(w) is not None else None
        old, new = weight_ranges(config, old_spec), weight_ranges(config, new_spec)
        total = sum((hi - lo) * sizer.row_bytes(n) for n, (lo, hi) in new.items() if old.get(n) != (lo, hi))
        total += sum(sizer.bytes(t.piece) for t in plan.transfers if t.dst == w and isinstance(t.piece, WeightPiece))
        kept = same_blocks and old_spec is not None and old_spec.kv_heads == new_spec.kv_heads
        total += sum(
            len(new_spec.kv_heads) * kv_head_bytes
            for layer in new_spec.layers
            if not (kept and layer in old_spec.layers)
        )
        out[w] = total
    return out
