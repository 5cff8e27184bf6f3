"""Data-parallel replicas behind one engine: each its own scheduler and KV block space and its own steps in
flight; a router sends each new request to one of them; a switch across DP hands each replica's requests (and
cached blocks) to the new replicas the planner routes them to."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from remp.block_pool import BlockPool
from remp.request import Request
from remp.scheduler import ScheduledBatch, Scheduler


@dataclass
class InFlight:
    step_id: int
    batch: ScheduledBatch
    sampled: list[Request]
    submitted: float  # perf_counter at submission
    starts: list[int]  # the first position of each scheduled request's chunk


@dataclass
class Replica:
    scheduler: Scheduler
    in_flight: deque[InFlight] = field(default_factory=deque)

    def busy(self) -> set[Request]:
        """Requests in a micro-batch still in the pipeline."""
        return {r for f in self.in_flight for r, _ in f.batch.scheduled}

    def tokens_in_flight(self) -> dict[Request, int]:
        """Tokens of each request in micro-batches still in the pipeline (counted as computed already)."""
        out: dict[Request, int] = {}
        for f in self.in_flight:
            for r, n in f.batch.scheduled:
                out[r] = out.get(r, 0) + n
        return out

    def outstanding_tokens(self) -> int:
        """Tokens this replica has yet to compute or generate for the requests it holds."""
        s = self.scheduler
        return sum(r.num_uncomputed_tokens + r.max_tokens - r.num_output_tokens for r in [*s.waiting, *s.running])


def route(replicas: list[Replica], req: Request) -> int:
    """The replica for a new request: the least work outstanding, counting the prompt tokens its prefix cache
    would spare; then the most free KV blocks; then the lowest index."""

    def cost(i: int) -> tuple[int, int, int]:
        s = replicas[i].scheduler
        return replicas[i].outstanding_tokens() - s.cached_prefix_tokens(req), -s.pool.num_free, i

    return 0 if len(replicas) == 1 else min(range(len(replicas)), key=cost)


def rebuild(
    old: list[Replica],
    num_replicas: int,
    num_blocks: int,
    assignment: dict[str, int],
    block_maps: dict[tuple[int, int], dict[int, int]],
    make_scheduler,
) -> list[Replica]:
    """The new replicas after a switch moved the KV: request r of old replica s runs on in replica
    assignment[r] with its blocks renamed by block_maps[(s, d)] (cached free blocks too, where a map names
    them); waiting requests keep their place in line, each on the new replica its old one maps to."""
    new = [Replica(make_scheduler(num_blocks)) for _ in range(num_replicas)]
    sources: dict[int, list[tuple[BlockPool, dict[int, int]]]] = {d: [] for d in range(num_replicas)}
    for (s, d), block_map in block_maps.items():
        sources[d].append((old[s].scheduler.pool, block_map))
    running = sorted(
        ((s, r) for s, rep in enumerate(old) for r in rep.scheduler.running),
        key=lambda sr: (sr[1].metrics.first_scheduled_time or 0.0, sr[0]),
    )  # oldest first, across the old replicas
    for s, req in running:
        d = assignment[req.request_id]
        req.block_ids = [block_maps[(s, d)][b] for b in req.block_ids]
        new[d].scheduler.running.append(req)
    for d, rep in enumerate(new):
        caching, held = rep.scheduler.pool.caching, [r.block_ids for r in rep.scheduler.running]
        rep.scheduler.pool = BlockPool.merged(num_blocks, caching, sources[d], held)
    for s, rep in enumerate(old):  # counters carry over (their sums are what metrics report)
        to = new[s % num_replicas].scheduler
        to.waiting.extend(rep.scheduler.waiting)
        to.num_preemptions += rep.scheduler.num_preemptions
        to.pool.queries += rep.scheduler.pool.queries
        to.pool.hits += rep.scheduler.pool.hits
    return new
