"""Planner properties (pure): every needed piece has exactly one source, kept bytes are maximal over all
placements, moved + kept = needed, replicated KV heads the destination holds are never sent; a mixture of
experts moves ranges of whole experts like any other range."""

import itertools

import pytest

from remp.model.families import config_from_hf
from remp.planner.plan import (
    CHECKPOINT,
    ByteCounts,
    KVPiece,
    PieceSizer,
    WeightPiece,
    best_placement,
    make_plan,
    worker_pieces,
)
from remp.tools.random_model import tiny_config
from remp.topology import Topology

MODELS = {
    "6h2kv": config_from_hf(tiny_config()),
    "9h3kv_tied": config_from_hf(
        tiny_config(
            num_attention_heads=9, num_key_value_heads=3, hidden_size=72, tie_word_embeddings=True, num_hidden_layers=5
        )
    ),
    "mha4": config_from_hf(tiny_config(num_attention_heads=4, num_key_value_heads=4, hidden_size=64)),
    "moe3": config_from_hf(tiny_config(model_type="mixtral")),  # 3 experts: TP4 leaves a rank without
}
FOUR = [(4, 1), (2, 2), (1, 4)]
PAIRS = [(a, b) for a in FOUR for b in FOUR if a != b]


def sizer(cfg):
    return PieceSizer(cfg, 8, kv_blocks_used=5, block_size=8)


def coverage(plan, cfg, sz):
    """For each worker and needed piece: the ranges (or KV pieces) it ends with, kept or received."""
    for w, needs in plan.needs.items():
        held = [] if plan.old is None else worker_pieces(cfg, plan.old, w, True)
        held_w = {p.name: (p.start, p.stop) for p in held if isinstance(p, WeightPiece)}
        held_kv = {p for p in held if isinstance(p, KVPiece)}
        incoming = [t for t in plan.transfers if t.dst == w]
        for need in needs:
            if isinstance(need, KVPiece):
                n = sum(t.piece == need for t in incoming) + (need in held_kv)
                assert n == 1, (w, need, n)
                if need in held_kv:
                    assert not any(t.piece == need for t in incoming), "sent a KV head the destination holds"
                continue
            cover = [0] * (need.stop - need.start)
            if need.name in held_w:
                lo, hi = max(need.start, held_w[need.name][0]), min(need.stop, held_w[need.name][1])
                for i in range(lo, hi):
                    cover[i - need.start] += 1
            for t in incoming:
                if isinstance(t.piece, WeightPiece) and t.piece.name == need.name:
                    assert t.src != w
                    for i in range(t.piece.start, t.piece.stop):
                        cover[i - need.start] += 1
            assert set(cover) == {1}, (w, need.name)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("old, new", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_plan_sources_and_optimality(model, old, new):
    cfg, old_t = MODELS[model], Topology(*old)
    sz = sizer(cfg)
    new_t = best_placement(cfg, old_t, *new, sz)
    plan = make_plan(cfg, old_t, new_t, sz)
    coverage(plan, cfg, sz)
    assert all(t.src != CHECKPOINT for t in plan.transfers)  # every piece has a live holder
    needed = sum(sz.bytes(p) for ps in plan.needs.values() for p in ps)
    assert plan.kept.total + plan.moved.total == needed
    assert plan.moved.total == plan.minimum.total
    # kept bytes are maximal over every placement of the new coordinates
    best_kept = 0
    for perm in itertools.permutations(range(4)):
        p = make_plan(cfg, old_t, Topology(*new, perm), sz)
        best_kept = max(best_kept, p.kept.total)
    assert plan.kept.total == best_kept


def test_sends_spread_over_replicated_holders():
    cfg = MODELS["6h2kv"]  # TP4: each KV head replicated on two workers
    sz = sizer(cfg)
    plan = make_plan(cfg, Topology(4, 1), best_placement(cfg, Topology(4, 1), 1, 4, sz), sz)
    sent = {w: sum(sz.bytes(t.piece) for t in plan.transfers if t.src == w) for w in range(4)}
    held = {w: worker_pieces(cfg, Topology(4, 1), w, True) for w in range(4)}
    spread = 0
    for t in plan.transfers:
        holders = [w for w in held if any(_covers(h, t.piece) for h in held[w])]
        spread += len(holders) > 1
        # no other holder could have sent it and left the busiest sender less busy
        assert all(sent[t.src] <= sent[h] + sz.bytes(t.piece) for h in holders), (t, sent)
    assert spread > 0


def _covers(held, piece) -> bool:
    if isinstance(piece, KVPiece):
        return held == piece
    return (
        isinstance(held, WeightPiece)
        and held.name == piece.name
        and held.start <= piece.start < piece.stop <= held.stop
    )


def test_cold_start_plan_reads_everything_from_checkpoint():
    cfg = MODELS["9h3kv_tied"]
    sz = sizer(cfg)
    plan = make_plan(cfg, None, Topology(2, 2), sz, with_kv=False)
    assert plan.transfers and all(t.src == CHECKPOINT for t in plan.transfers)
    assert plan.moved.total == 0 and plan.from_checkpoint.total > 0


def held_elements(cfg, topology, workers, piece):
    """Element indices of a weight piece (or {0} for a KV piece) that these workers hold under `topology`."""
    out = set()
    for w in workers:
        for p in worker_pieces(cfg, topology, w, True):
            if isinstance(piece, KVPiece) and p == piece:
                out.add(0)
            elif isinstance(piece, WeightPiece) and isinstance(p, WeightPiece) and p.name == piece.name:
                out.update(range(max(p.start, piece.start), min(p.stop, piece.stop)))
    return out


def test_lost_worker_pieces_come_from_survivors_or_checkpoint():
    """TP2xPP2 loses worker 3 (stage 1, TP rank 1) and becomes PP3 on the survivors: whatever a survivor holds
    comes from a survivor, exactly what only the lost worker held comes from the checkpoint."""
    cfg = MODELS["6h2kv"]
    sz = sizer(cfg)
    old, survivors = Topology(2, 2), (0, 1, 2)
    plan = make_plan(cfg, old, Topology(1, 3, placement=survivors), sz, lost=frozenset({3}))
    coverage(plan, cfg, sz)
    for t in plan.transfers:
        whole = {0} if isinstance(t.piece, KVPiece) else set(range(t.piece.start, t.piece.stop))
        if t.src == CHECKPOINT:
            assert not held_elements(cfg, old, survivors, t.piece), t  # from disk only what no survivor has
        else:
            assert t.src in survivors and held_elements(cfg, old, [t.src], t.piece) == whole, t
    only_lost = ByteCounts()
    for p in worker_pieces(cfg, old, 3, True):
        n = 1 if isinstance(p, KVPiece) else p.stop - p.start
        missing = n - len(held_elements(cfg, old, survivors, p))
        only_lost.add(p, sz.bytes(p) * missing // n)
    assert only_lost.weights > 0 and only_lost.kv > 0
    assert (plan.from_checkpoint.weights, plan.from_checkpoint.kv) == (only_lost.weights, only_lost.kv)


@pytest.mark.parametrize("old, new", [((4, 1), (2, 2)), ((2, 2), (4, 1)), ((2, 1), (3, 1)), ((3, 1), (1, 2))])
def test_moe_switch_moves_whole_experts_from_their_holders(old, new):
    """Each expert tensor is one stacked tensor split along the expert axis: a switch sends exactly the experts a
    worker gains, each from a worker that held it, whole (every row of it), and moves no more than the minimum."""
    cfg = MODELS["moe3"]
    sz = sizer(cfg)
    old_t = Topology(*old)
    pool = list(range(max(old_t.size, new[0] * new[1])))
    new_t = best_placement(cfg, old_t, *new, sz, workers=pool)
    plan = make_plan(cfg, old_t, new_t, sz)
    coverage(plan, cfg, sz)
    assert plan.moved.total == plan.minimum.total

    def experts(t, w, layer):
        spec = t.spec(cfg, w) if t.coordinate(w) is not None else None
        return set(spec.experts) if spec is not None and layer in spec.layers else set()

    sent = [t for t in plan.transfers if ".experts.*." in getattr(t.piece, "name", "")]
    assert sent
    per_expert = cfg.intermediate_size * cfg.hidden_size * sz.itemsize
    for t in sent:
        moved, layer = set(range(t.piece.start, t.piece.stop)), t.piece.layer
        assert moved <= experts(new_t, t.dst, layer) - experts(old_t, t.dst, layer), t
        assert moved <= experts(old_t, t.src, layer), t
        assert sz.bytes(t.piece) == len(moved) * per_expert
