"""Plans: which pieces every worker must end with under a topology, and where each comes from.

A piece is a weight slice (a range of one checkpoint tensor along its shard axis) or a KV slice (one layer x
one KV head, over the blocks in use that go from an old replica to a new one). A plan maps new coordinates onto
workers so that the most bytes stay in place (an assignment problem), then gives every missing piece exactly
one source: a peer that holds it under the old topology (spreading sends over holders) or, where no peer has
it, the checkpoint. Pure functions: no tensors, no processes; the executor in the worker follows the plan.

With data parallelism every replica holds the whole model and its own KV blocks. The running requests of an old
replica go to the new replicas that keep the most of its KV in place (`kv_routes`; several when they tie, e.g.
one TP2 replica split into two TP1 replicas); the KV of a route (old replica -> new replica) is its own set of
pieces. Weights have no replica: a new replica's worker takes a slice from whichever old worker holds it.
"""

from __future__ import annotations

import copy
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
    src: int = 0  # the old replica whose blocks these are ...
    dst: int = 0  # ... and the new replica they go to


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
    routes: dict[int, list[int]] = field(default_factory=dict)  # old replica -> new replicas its KV may go to


Route = tuple[int, int]  # (old replica, new replica)


class PieceSizer:
    """Bytes of pieces for one model and dtype, with the KV blocks in use: a number (one replica to one), or the
    blocks of each route (old replica, new replica)."""

    def __init__(self, config: ModelConfig, itemsize: int, kv_blocks_used: int | dict[Route, int], block_size: int):
        self.config, self.itemsize = config, itemsize
        self.block_bytes = 2 * block_size * config.head_dim * itemsize  # one block of one layer x head
        self.kv_blocks = kv_blocks_used if isinstance(kv_blocks_used, dict) else {(0, 0): kv_blocks_used}

    def with_blocks(self, kv_blocks: dict[Route, int]) -> PieceSizer:
        """The same model and dtype with other KV blocks in use."""
        out = copy.copy(self)
        out.kv_blocks = kv_blocks
        return out

    @property
    def kv_piece_bytes(self) -> int:
        """Bytes of a KV piece of all the blocks in use (one layer x head)."""
        return sum(self.kv_blocks.values()) * self.block_bytes

    def row_bytes(self, name: str) -> int:
        return tensor(self.config, name).rows_per_unit * self.itemsize

    def bytes(self, piece: Piece) -> int:
        if isinstance(piece, KVPiece):
            return self.kv_blocks.get((piece.src, piece.dst), 0) * self.block_bytes
        return (piece.stop - piece.start) * self.row_bytes(piece.name)


def weight_ranges(config: ModelConfig, spec: ShardSpec | None) -> dict[str, tuple[int, int]]:
    """Each checkpoint tensor a shard holds, as the range it holds along the tensor's shard axis."""
    return {} if spec is None else shard_tensors(config, spec)


def kv_heads_of(config: ModelConfig, topology: Topology, worker: int) -> set[tuple[int, int]]:
    """(layer, KV head) pairs whose KV a worker holds under a topology (for its replica's blocks)."""
    if topology.coordinate(worker) is None:
        return set()
    spec = topology.spec(config, worker)
    return {(layer, h) for layer in spec.layers for h in spec.kv_heads}


def worker_pieces(
    config: ModelConfig,
    topology: Topology,
    worker: int,
    with_kv: bool,
    routes: dict[int, list[int]] | None = None,
    held: bool = True,
) -> list[Piece]:
    """Every piece a worker holds under a topology (held=True: the old one; its KV leaves by the routes out of
    its replica) or needs under it (held=False: the new one; its KV arrives by the routes into its replica).
    Nothing if the topology leaves it idle. routes None: one replica to one (route (0, 0))."""
    if topology.coordinate(worker) is None:
        return []
    spec = topology.spec(config, worker)
    pieces: list[Piece] = [WeightPiece(name, *r) for name, r in weight_ranges(config, spec).items()]
    if with_kv:
        r = topology.replica_of(worker)
        routes = routes if routes is not None else {0: [0]}
        pairs = [(r, d) for d in routes.get(r, [])] if held else [(s, r) for s, ds in routes.items() if r in ds]
        pieces += [
            KVPiece(layer, h, s, d) for s, d in pairs for layer, h in sorted(kv_heads_of(config, topology, worker))
        ]
    return pieces


def kv_routes(
    config: ModelConfig, old: Topology, new: Topology, lost: frozenset[int] = frozenset()
) -> dict[int, list[int]]:
    """For each old replica, the new replicas its requests (and their KV) may go to: those whose workers keep
    the most of its KV in place (every one that ties; all of them when none keeps any)."""
    routes = {}
    for s in range(old.dp):
        kept = []
        for d in range(new.dp):
            n = 0
            for w in new.replica_workers(d):
                if w not in lost and old.replica_of(w) == s:
                    n += len(kv_heads_of(config, old, w) & kv_heads_of(config, new, w))
            kept.append(n)
        routes[s] = [d for d in range(new.dp) if kept[d] == max(kept)]
    return routes


def kv_lost_replicas(config: ModelConfig, topology: Topology, workers: set[int]) -> set[int]:
    """Replicas of which some KV (a layer x KV head) is held only by `workers`: lost with them. Empty when TP
    replicates every KV head of theirs inside their replica (tp > KV heads)."""
    out = set()
    for r in range(topology.dp):
        members = topology.replica_workers(r)
        theirs = set().union(*(kv_heads_of(config, topology, w) for w in members if w in workers))
        if theirs - set().union(*(kv_heads_of(config, topology, w) for w in members if w not in workers)):
            out.add(r)
    return out


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
    dp: int = 1,
) -> Topology:
    """The placement of the new coordinates (dp replicas of TP x PP) on the pool's workers (default: old's) that
    keeps the most bytes in place. A pool larger than the topology leaves the workers that would keep the least
    idle. With `links` (a pool on several nodes) each part a worker must receive is priced at the bandwidth of
    the fastest link to a holder of it, and the placement minimises the receivers' total time (a proxy for the
    slowest one's); among placements of equal cost, each TP group stays inside a node and the pipeline crosses
    nodes. The KV is counted as if every replica's went where its layer x head is kept (a new replica takes
    1/dp of the blocks in use): which requests go where is decided once the placement is known (kv_routes)."""
    workers = sorted(old.placement if workers is None else workers)
    draft = Topology(tp, pp, tuple(range(dp * tp * pp)), layers_per_stage, dp)
    if draft.size > len(workers):
        raise ValueError(f"{draft} needs {draft.size} workers, but the pool has {len(workers)}")
    sizer = sizer.with_blocks({(0, 0): -(-sum(sizer.kv_blocks.values()) // dp)})
    index = {
        w: _index(_merged_kv(worker_pieces(config, old, w, with_kv, {r: [0] for r in range(old.dp)}))) for w in workers
    }
    homes = links.stage_homes(tp, dp * pp, workers) if links is not None else [None] * (dp * pp)
    cost = np.zeros((draft.size, len(workers)))
    for c in range(draft.size):
        need = _merged_kv(worker_pieces(config, draft, c, with_kv, {r: [r] for r in range(dp)}, held=False))
        home = homes[c // tp]
        for j, w in enumerate(workers):
            if links is None or not links.multi_node:
                missing = float(sum(sizer.bytes(p) - _held_bytes(sizer, p, *index[w]) for p in need))
            else:
                missing = round(1e9 * _receive_s(sizer, need, w, index, links))  # nanoseconds
            away = home is not None and links.nodes[w] != home
            cost[c, j] = missing * (draft.size + 1) + away  # the tie-break never outweighs a byte or a ns
    rows, cols = linear_sum_assignment(cost)
    placement = [0] * draft.size
    for c, j in zip(rows, cols):
        placement[c] = workers[j]
    return Topology(tp, pp, tuple(placement), layers_per_stage, dp)


def _merged_kv(pieces: list[Piece]) -> list[Piece]:
    """KV pieces whatever their route: (layer, head) only, as the placement counts them."""
    return list(dict.fromkeys(KVPiece(p.layer, p.kv_head) if isinstance(p, KVPiece) else p for p in pieces))


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
) -> Plan:
    """Sources for every piece of every worker under `new`. `old` None means cold start (checkpoint);
    workers in `lost` hold nothing any more (their pieces come from survivors or the checkpoint). With `links`,
    a holder on the receiver's node is preferred to one across nodes."""
    workers = sorted(new.placement)
    routes = kv_routes(config, old, new, lost) if old is not None and with_kv else {}
    needs = {w: worker_pieces(config, new, w, with_kv, routes, held=False) for w in workers}
    held = (
        {}
        if old is None
        else {w: _index(worker_pieces(config, old, w, with_kv, routes)) for w in old.placement if w not in lost}
    )
    plan = Plan(old, new, needs, [], routes=routes)
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
    plan.minimum = _minimum(config, old, new, sizer, with_kv, lost)
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
    config: ModelConfig, old: Topology | None, new: Topology, sizer: PieceSizer, with_kv: bool, lost: frozenset[int]
) -> ByteCounts:
    """Bytes any plan must bring to workers: what the new shards need minus what the best placement keeps.
    Split by kind at that optimum."""
    out = ByteCounts()
    if old is None:
        return out
    pool = sorted(set(old.placement) | set(new.placement))
    best = new
    if not lost:
        best = best_placement(config, old, new.tp, new.pp, sizer, new.layers_per_stage, with_kv, pool, dp=new.dp)
    routes = kv_routes(config, old, best, lost) if with_kv else {}
    for w in best.placement:
        held = [] if w in lost else worker_pieces(config, old, w, with_kv, routes)
        weights, kv = _index(held)
        for p in worker_pieces(config, best, w, with_kv, routes, held=False):
            out.add(p, sizer.bytes(p) - _held_bytes(sizer, p, weights, kv))
    return out


def staging_bytes(
    config: ModelConfig, plan: Plan, sizer: PieceSizer, num_blocks: int, block_size: int, same_blocks: bool
) -> dict[int, int]:
    """Extra bytes each worker holds at the peak of a live switch: the new tensors it assembles (for every
    changed range) and the pieces it receives for them, and the KV layers it cannot keep (other heads, or a
    pool of another size). The old shard serves until the cut-over, so none of this replaces anything yet."""
    kv_head_bytes = 2 * num_blocks * block_size * config.head_dim * sizer.itemsize
    into = {d: [s for s, ds in plan.routes.items() if d in ds] for d in range(plan.new.dp)}
    out = {}
    for w in plan.new.placement:
        new_spec = plan.new.spec(config, w)
        old_spec = plan.old.spec(config, w) if plan.old is not None and plan.old.coordinate(w) is not None else None
        old, new = weight_ranges(config, old_spec), weight_ranges(config, new_spec)
        total = sum((hi - lo) * sizer.row_bytes(n) for n, (lo, hi) in new.items() if old.get(n) != (lo, hi))
        total += sum(sizer.bytes(t.piece) for t in plan.transfers if t.dst == w and isinstance(t.piece, WeightPiece))
        kept = same_blocks and old_spec is not None and old_spec.kv_heads == new_spec.kv_heads
        kept = kept and into[plan.new.replica_of(w)] == [plan.old.replica_of(w)]  # its own replica's blocks only
        total += sum(
            len(new_spec.kv_heads) * kv_head_bytes
            for layer in new_spec.layers
            if not (kept and layer in old_spec.layers)
        )
        out[w] = total
    return out
