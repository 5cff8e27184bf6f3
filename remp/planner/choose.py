"""Which topology a pool should run: the candidates a model allows on n workers, and the one to pick after a
worker is lost. Pure planning, like plan.py."""

from __future__ import annotations

from remp.config import ModelConfig
from remp.nodes import Links
from remp.planner.plan import PieceSizer, best_placement, make_plan
from remp.topology import Topology


def candidates(config: ModelConfig, num_workers: int, data_parallel: bool = False) -> list[Topology]:
    """Every TP x PP shape of exactly num_workers workers that the model allows (uneven TP splits included); with
    data_parallel, every DP x TP x PP shape (DP1 first)."""
    out = []
    for dp in range(1, (num_workers if data_parallel else 1) + 1):
        for tp in range(1, num_workers // dp + 1):
            if num_workers % (dp * tp) == 0:
                t = Topology(tp, num_workers // (dp * tp), dp=dp)
                try:
                    t.validate(config)
                except ValueError:
                    continue
                out.append(t)
    return out


def choose_after_loss(
    config: ModelConfig,
    old: Topology,
    pool: list[int],
    sizer: PieceSizer,
    lost: frozenset[int],
    with_kv: bool,
    links: Links | None = None,
) -> Topology:
    """The topology for the workers in `pool` after `old` lost the workers in `lost`, placed: as many workers
    as the model allows, then the fewest bytes to read from the checkpoint or move between workers (the
    survivors keep what they hold; with_kv: the KV in use moves too), then the widest TP (no pipeline
    bubbles). A pool that ran replicas may keep running some (an intact replica moves nothing)."""
    for size in range(len(pool), 0, -1):
        scored = []
        for shape in candidates(config, size, data_parallel=old.dp > 1):
            placed = best_placement(config, old, shape.tp, shape.pp, sizer, None, with_kv, pool, links, shape.dp)
            plan = make_plan(config, old, placed, sizer, with_kv=with_kv, lost=lost, links=links)
            scored.append((plan.from_checkpoint.total + plan.moved.total, -shape.tp, placed))
        if scored:
            return min(scored, key=lambda s: s[:2])[2]
    raise ValueError(f"no topology of {config.num_hidden_layers} layers fits {len(pool)} workers")
