"""The planner on a pool that spans nodes (pure): bytes priced per link, TP groups kept inside a node when the
cost is equal, a holder on the receiver's node preferred, and the single-node answer unchanged."""

import itertools

import pytest

from remp.model.families import config_from_hf
from remp.nodes import Links
from remp.planner.plan import PieceSizer, best_placement, make_plan
from remp.tools.random_model import tiny_config
from remp.topology import Topology

CFG = config_from_hf(tiny_config(num_hidden_layers=8))
SIZER = PieceSizer(CFG, 8, kv_blocks_used=5, block_size=8)
TWO_BY_TWO = Links((0, 0, 1, 1), intra_Bps=5e9, inter_Bps=1e8)
SHAPES = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4), (1, 3)]


def receive_s(plan, links) -> float:
    """What the priced placement minimises: the receivers' total time, each transfer over its own link, reads
    from the checkpoint at the intra-node rate."""
    return sum(
        SIZER.bytes(t.piece) / (links.bandwidth(t.src, t.dst) if t.src >= 0 else links.intra_Bps)
        for t in plan.transfers
    )


def stage_nodes(topology, links) -> list[set[int]]:
    return [{links.nodes[w] for w in topology.stage_workers(s)} for s in range(topology.pp)]


@pytest.mark.parametrize("links", [TWO_BY_TWO, Links((0, 1, 0, 1), 5e9, 1e8), Links((0, 0, 0, 1), 5e9, 1e8)])
@pytest.mark.parametrize("old, new", [(a, b) for a in SHAPES for b in SHAPES if a != b and a[0] * a[1] <= 4])
def test_link_priced_placement_is_never_slower(old, new, links):
    old_t = Topology(*old)
    bytes_only = best_placement(CFG, old_t, *new, SIZER, workers=[0, 1, 2, 3])
    priced = best_placement(CFG, old_t, *new, SIZER, workers=[0, 1, 2, 3], links=links)
    slow = receive_s(make_plan(CFG, old_t, bytes_only, SIZER, links=links), links)
    fast = receive_s(make_plan(CFG, old_t, priced, SIZER, links=links), links)
    assert fast <= slow * (1 + 1e-9)


def test_growing_takes_the_idle_worker_on_the_holders_node():
    """TP1 -> TP2 with idle workers on both nodes: by bytes alone they are equal (both hold nothing) and the
    lowest rank, across the link, is taken; priced, the one beside the holder is, and the switch is 50x faster."""
    links = Links((0, 1, 0, 1), 5e9, 1e8)
    old = Topology(1, 1, (0,))
    bytes_only = best_placement(CFG, old, 2, 1, SIZER, workers=[0, 1, 2, 3])
    priced = best_placement(CFG, old, 2, 1, SIZER, workers=[0, 1, 2, 3], links=links)
    assert sorted(bytes_only.placement) == [0, 1] and sorted(priced.placement) == [0, 2]
    slow = receive_s(make_plan(CFG, old, bytes_only, SIZER, links=links), links)
    fast = receive_s(make_plan(CFG, old, priced, SIZER, links=links), links)
    assert fast * 40 < slow


def test_shrinking_onto_the_node_that_holds_most_beats_keeping_most():
    """TP1xPP4 -> TP1 on nodes (0, 0, 0, 1): the last stage's worker keeps the most bytes (its layers and the
    lm-head), but it is alone on node 1 and would receive the other three stages over the slow link. Priced,
    a worker on node 0 takes it: two stages arrive inside the node and only one crosses."""
    links = Links((0, 0, 0, 1), 5e9, 1e8)
    old = Topology(1, 4)
    bytes_only = best_placement(CFG, old, 1, 1, SIZER, workers=[0, 1, 2, 3])
    priced = best_placement(CFG, old, 1, 1, SIZER, workers=[0, 1, 2, 3], links=links)
    assert bytes_only.placement == (3,) and links.nodes[priced.placement[0]] == 0
    slow = receive_s(make_plan(CFG, old, bytes_only, SIZER, links=links), links)
    fast = receive_s(make_plan(CFG, old, priced, SIZER, links=links), links)
    assert fast * 2 < slow


def test_tp_inside_a_node_and_pp_across_on_a_cold_pool():
    """No old shards (every placement costs the same): stages fill the nodes in order."""
    links = Links((0, 1, 0, 1))  # interleaved ranks: the placement must not follow rank order
    empty = Topology(1, 1, (9,))  # a topology on a worker outside the pool: nothing kept
    placed = best_placement(CFG, empty, 2, 2, SIZER, workers=[0, 1, 2, 3], links=links)
    assert stage_nodes(placed, links) == [{0}, {1}]


# Placements of the bytes-only planner (links=None), pool [0, 1, 2, 3]: the same with links of one node. First
# taken before link pricing existed (b49dc51); retaken when the lm-head was split over the last stage's TP ranks,
# which changed what each worker holds. Each keeps the most bytes any placement can (checked below).
BEFORE_LINKS = {
    ((4, 1), (2, 2)): (0, 2, 1, 3),
    ((4, 1), (1, 4)): (0, 2, 1, 3),
    ((4, 1), (3, 1)): (0, 1, 3),
    ((2, 2), (4, 1)): (0, 2, 1, 3),
    ((2, 2), (1, 4)): (0, 1, 2, 3),
    ((2, 2), (1, 3)): (0, 2, 3),
    ((1, 4), (2, 2)): (0, 1, 3, 2),
    ((1, 4), (2, 1)): (0, 3),
    ((1, 1), (2, 2)): (0, 1, 2, 3),
    ((2, 1), (1, 4)): (0, 3, 2, 1),
    ((1, 2), (3, 1)): (1, 2, 0),
    ((3, 1), (1, 3)): (2, 0, 1),
}


@pytest.mark.parametrize("old, new", list(BEFORE_LINKS))
def test_placement_without_links_is_as_before(old, new):
    for links in (None, Links.one_node(4)):
        placed = best_placement(CFG, Topology(*old), *new, SIZER, workers=[0, 1, 2, 3], links=links)
        assert placed.placement == BEFORE_LINKS[(old, new)]
    kept = [
        make_plan(CFG, Topology(*old), Topology(*new, perm), SIZER).kept.total
        for perm in itertools.permutations(range(4), new[0] * new[1])
    ]
    assert make_plan(CFG, Topology(*old), placed, SIZER).kept.total == max(kept)


def test_a_holder_on_the_receivers_node_is_the_source():
    """With 2 KV heads and TP4, each KV head is on two workers, one on each node here: a receiver takes it from
    the one on its own node."""
    old = Topology(4, 1)
    links = Links((0, 1, 0, 1), 5e9, 1e8)
    new = Topology(1, 4, (0, 1, 2, 3))
    plan = make_plan(CFG, old, new, SIZER, links=links)
    crossing = [t for t in plan.transfers if t.src >= 0 and links.nodes[t.src] != links.nodes[t.dst]]
    local = make_plan(CFG, old, new, SIZER)
    crossing_unpriced = [t for t in local.transfers if t.src >= 0 and links.nodes[t.src] != links.nodes[t.dst]]
    assert plan.moved.total == local.moved.total  # the same bytes, from nearer holders
    assert len(crossing) < len(crossing_unpriced)


def test_stage_homes_fill_nodes_in_order():
    links = Links((0, 0, 1, 1, 2, 2))
    assert links.stage_homes(2, 3, list(range(6))) == [0, 1, 2]
    assert links.stage_homes(1, 4, list(range(4))) == [0, 0, 1, 1]
    assert links.stage_homes(3, 1, list(range(4))) == [None]  # no node holds three
