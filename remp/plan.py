"""Plans: which pieces every worker must end with under a topology, and where each comes from.

A piece is a weight slice (a range of one checkpoint tensor along its shard axis) or a KV slice (one layer x
one KV head, over every block in use). A plan maps new coordinates onto workers so that the most bytes stay in
place (an assignment problem), then gives every missing piece exactly one source: a peer that holds it under
the old topology (spreading sends over holders) or, where no peer has it, the checkpoint. Pure functions:
no tensors, no processes; the executor in the worker follows the plan.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from remp.config import ModelConfig
from remp.sharding import ShardSpec, weight_slices
from remp.topology import Topology

CHECKPOINT = -1  # source id of pieces read from the checkpoint
ROW_PARALLEL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # sliced by columns


def shard_axis(name: str) -> int:
    return 1 if name.endswith(ROW_PARALLEL) else 0


def tensor_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    H, D, I, V = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    last = name.rsplit(".", 2)
    kind = ".".join(last[-2:])
    shapes = {
        "q_proj.weight": (q, H),
        "k_proj.weight": (kv, H),
        "v_proj.weight": (kv, H),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "o_proj.weight": (H, q),
        "gate_proj.weight": (I, H),
        "up_proj.weight": (I, H),
        "down_proj.weight": (H, I),
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "norm.weight": (H,),
        "embed_tokens.weight": (V, H),
        "lm_head.weight": (V, H),
    }
    return shapes[kind]


@dataclass(frozen=True, order=True)
class WeightPiece:
    name: str
    start: int  # range along shard_axis(name)
    stop: int

    @property
    def layer(self) -> int:
        """Layer index, or -1 for the embedding, final norm and lm-head (moved first)."""
        return int(self.name.split(".")[2]) if self.name.startswith("model.layers.") else -1


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
        shape = tensor_shape(self.config, name)
        return int(np.prod(shape)) // shape[shard_axis(name)] * self.itemsize

    def bytes(self, piece: Piece) -> int:
        if isinstance(piece, KVPiece):
            return self.kv_piece_bytes
        return (piece.stop - piece.start) * self.row_bytes(piece.name)


def weight_ranges(config: ModelConfig, spec: ShardSpec | None) -> dict[str, tuple[int, int]]:
    """Each checkpoint tensor a shard holds, as the range it holds along the tensor's shard axis."""
    if spec is None:
        return {}
    out = {}
    for name, slices in weight_slices(config, spec).items():
        axis = shard_axis(name)
        s = slices[axis] if len(slices) > axis else slice(None)
        out[name] = s.indices(tensor_shape(config, name)[axis])[:2]
    return out


def worker_pieces(config: ModelConfig, topology: Topology, worker: int, with_kv: bool) -> list[Piece]:
    """Every piece a worker holds under a topology (nothing if the topology leaves it idle)."""
    if topology.coordinate(worker) is None:
        return []
    spec = topology.spec(config, worker)
    pieces: list[Piece] = [WeightPiece(name, *r) for name, r in weight_ranges(config, spec).items()]
    if with_kv:
        pieces += [KVPiece(layer, h) for layer in spec.layers for h in spec.kv_heads]
    return pieces


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


def _kept_bytes(sizer: PieceSizer, need: list[Piece], held: list[Piece]) -> int:
    weights, kv = _index(held)
    return sum(_held_bytes(sizer, p, weights, kv) for p in need)


def best_placement(
    config: ModelConfig,
    old: Topology,
    tp: int,
    pp: int,
    sizer: PieceSizer,
    layers_per_stage: tuple[int, ...] | None = None,
    with_kv: bool = True,
) -> Topology:
    """The placement of the new coordinates on old's workers that keeps the most bytes in place."""
    workers = sorted(old.placement)
    draft = Topology(tp, pp, tuple(range(tp * pp)), layers_per_stage)
    if draft.size != len(workers):
        raise ValueError(f"{draft} needs {draft.size} workers, but the pool has {len(workers)}")
    held = {w: worker_pieces(config, old, w, with_kv) for w in workers}
    gain = np.zeros((draft.size, len(workers)))
    for c in range(draft.size):
        need = worker_pieces(config, draft, c, with_kv)
        for j, w in enumerate(workers):
            gain[c, j] = _kept_bytes(sizer, need, held[w])
    rows, cols = linear_sum_assignment(gain, maximize=True)
    placement = [0] * draft.size
    for c, j in zip(rows, cols):
        placement[c] = workers[j]
    return Topology(tp, pp, tuple(placement), layers_per_stage)


def make_plan(
    config: ModelConfig,
    old: Topology | None,
    new: Topology,
    sizer: PieceSizer,
    with_kv: bool = True,
    lost: frozenset[int] = frozenset(),
) -> Plan:
    """Sources for every piece of every worker under `new`. `old` None means cold start (checkpoint);
    workers in `lost` hold nothing any more (their pieces come from survivors or the checkpoint)."""
    workers = sorted(new.placement)
    needs = {w: worker_pieces(config, new, w, with_kv) for w in workers}
    held = (
        {}
        if old is None
        else {w: _index(worker_pieces(config, old, w, with_kv)) for w in old.placement if w not in lost}
    )
    plan = Plan(old, new, needs, [])
    load: dict[int, int] = defaultdict(int)  # bytes each holder sends, to spread the sends
    for dst in workers:
        mine = held.get(dst, ({}, set()))
        for piece in needs[dst]:
            kept = _overlap(piece, *mine)
            if isinstance(piece, KVPiece):
                if kept is not None:
                    plan.kept.add(piece, sizer.bytes(piece))
                    continue
                holders = [w for w, h in held.items() if piece in h[1]]
                src = min(holders, key=lambda w: (load[w], w)) if holders else CHECKPOINT
                _assign(plan, sizer, load, Transfer(piece, src, dst))
                continue
            gaps = [(piece.start, piece.stop)] if kept is None else [(piece.start, kept[0]), (kept[1], piece.stop)]
            if kept is not None:
                plan.kept.add(piece, sizer.bytes(WeightPiece(piece.name, *kept)))
            for lo, hi in gaps:
                if lo < hi:
                    for seg in _segments(piece.name, lo, hi, held):
                        holders = seg[2]
                        src = min(holders, key=lambda w: (load[w], w)) if holders else CHECKPOINT
                        _assign(plan, sizer, load, Transfer(WeightPiece(piece.name, seg[0], seg[1]), src, dst))
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
    best = best_placement(config, old, new.tp, new.pp, sizer, new.layers_per_stage, with_kv) if not lost else new
    for w in best.placement:
        held = [] if w in lost else worker_pieces(config, old, w, with_kv)
        weights, kv = _index(held)
        for p in worker_pieces(config, best, w, with_kv):
            out.add(p, sizer.bytes(p) - _held_bytes(sizer, p, weights, kv))
    return out
