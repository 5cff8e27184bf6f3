"""The driver's side of a switch, as a state machine the engine advances between its steps.

start: plan (placement over the pool, pieces); if the target needs more workers than the pool has, start them
(they hold nothing) and, once they are up (advance), regroup the pool into a new world with them; then send
PrepareSwitch; the workers create the new groups and, in live mode,
pre-copy the weights while the engine keeps stepping. advance (each step): once every worker is "precopied",
name the KV blocks that are full now (with their owner, to tell later whether they stayed put) and let the
workers copy them too; once they are "kv_precopied" (live) or "prepared" (stop), cut over: drain the in-flight
micro-batches (the pause starts), fit the blocks in use into the new pool, CommitSwitch with the blocks still
clean, wait, swap the scheduler's block table, stop the workers the new topology leaves idle (the rest
regroup), report. A worker that reports a
failure before the cut-over, or a pre-copy that outlives `timeout_s`, aborts the switch: the workers drop
what they staged and the old topology goes on serving. A worker that dies is a recovery (recovery.py).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from remp.executor import WorkerError
from remp.messages import AbortSwitch, CommitSwitch, PrecopyKV, PrepareSwitch, SwitchProgress
from remp.planner.mode import STOP, SwitchMode
from remp.planner.plan import KVPiece, PieceSizer, Plan, best_placement, make_plan, staging_bytes
from remp.switch.host import BlockOwner, SwitchHost, owners_unchanged
from remp.switch.report import SwitchReport
from remp.topology import Topology


class SwitchInProgress(RuntimeError):
    """A switch is already running; its message names the topology it switches to."""


class SwitchAborted(RuntimeError):
    """The switch was called off before the cut-over; the old topology kept serving."""


_ids = itertools.count(1)


@dataclass
class PendingSwitch:
    mode: SwitchMode  # not one that restarts: the engine does those itself
    old: Topology
    target: Topology  # as asked for (the plan's topology adds the placement)
    plan: Plan
    num_blocks: int
    on_done: Callable[[SwitchReport | None, BaseException | None], None]
    fallback: str | None = None
    switch_id: int = field(default_factory=lambda: next(_ids))
    t_start: float = field(default_factory=time.perf_counter)
    t_ready: float | None = None
    abort_reason: str | None = None
    kv_snapshot: dict[int, BlockOwner] | None = None  # pre-copied block -> its owner then
    kv_new_ids: dict[int, int] = field(default_factory=dict)  # pre-copied block -> its id in the new pool
    joining: bool = False  # workers added for this switch have yet to join the world (then PrepareSwitch)
    duty: float = 1.0
    lost: frozenset[int] = frozenset()  # recovery: workers of `old` that are gone
    with_kv: bool = True  # the KV in use moves (not after a loss of KV that only the lost workers held)
    committing: bool = False  # the cut-over's commit was sent: the workers' old shards are being consumed

    def __post_init__(self) -> None:
        self.expect = "precopied" if self.mode.precopy else "prepared"  # the stage that lets it move on


def new_block_ids(blocks: list[int], num_blocks: int, fixed: dict[int, int], in_use: list[int]) -> dict[int, int]:
    """Ids in a pool of num_blocks for `blocks` (each used once): those in `fixed` keep theirs, the others
    their own where it fits and is free, else the lowest free ids, avoiding ids other blocks in use hold now
    where possible (so those can keep theirs later)."""
    taken = set(fixed.values())
    out = dict(fixed)
    rest = [b for b in blocks if b not in out]
    for b in rest:
        if b < num_blocks and b not in taken:
            out[b] = b
            taken.add(b)
    held = set(in_use)
    free = (i for i in sorted(range(num_blocks), key=lambda i: i in held) if i not in taken)
    for b in rest:
        if b not in out:
            out[b] = next(free)
    return out


class SwitchDriver:
    """Owned by the engine, which it sees through `host` (host.py)."""

    def __init__(self, host: SwitchHost, staging_gb: float, precopy_duty: float, timeout_s: float):
        self.host, self.staging_gb, self.precopy_duty, self.timeout_s = host, staging_gb, precopy_duty, timeout_s
        self.pending: PendingSwitch | None = None
        self.link_costs = True  # price bytes per link (intra/inter node) when placing; False: bytes alone

    def interrupt(self) -> PendingSwitch | None:
        """A worker was lost: the switch in progress (returned) is over; the recovery ends it."""
        sw, self.pending = self.pending, None
        return sw

    def start(
        self,
        target: Topology,
        num_blocks: int,
        mode: SwitchMode,
        on_done: Callable[[SwitchReport | None, BaseException | None], None],
        old: Topology | None = None,
        lost: frozenset[int] = frozenset(),
        with_kv: bool = True,
    ) -> None:
        """`old` and `lost` (recovery): the topology before the loss, in the new world's ranks, with the lost
        workers' coordinates on ranks beyond it; their pieces come from the survivors or the checkpoint.
        with_kv False: the KV in use is not moved (every request recomputes it)."""
        if self.pending is not None:
            raise SwitchInProgress(str(self.pending.target))
        host, executor = self.host, self.host.executor
        old, cfg, block_size = old or host.topology, host.model_config, host.args.block_size
        sizer = PieceSizer(cfg, host.dtype.itemsize, len(host.blocks_in_use()), block_size)
        grow = target.size - executor.pool_size
        pool = list(range(max(executor.pool_size, target.size)))
        links = executor.links(len(pool)) if self.link_costs else None
        new = best_placement(
            cfg, old, target.tp, target.pp, sizer, target.layers_per_stage, with_kv=with_kv, workers=pool, links=links
        )
        plan = make_plan(cfg, old, new, sizer, with_kv=with_kv, lost=lost, links=links)
        fallback = None
        if mode.precopy:
            same_blocks = num_blocks == host.num_kv_blocks
            staging = staging_bytes(cfg, plan, sizer, num_blocks, block_size, same_blocks)
            if max(staging.values()) > self.staging_gb * 2**30:
                worst = max(staging, key=staging.get)
                fallback = (
                    f"live staging needs {staging[worst] / 2**20:.0f} MiB on worker {worst}, over the "
                    f"switch_staging_gb budget ({self.staging_gb:g} GiB): stop-the-world instead"
                )
                mode = STOP
        duty = self.precopy_duty
        if host.args.device == "cpu":  # workers sharing cores: the duty is of the machine, not of each worker
            duty *= min(1.0, (os.cpu_count() or 1) / len(pool))
        self.pending = PendingSwitch(
            mode,
            old,
            target,
            plan,
            num_blocks,
            on_done,
            fallback,
            joining=grow > 0,
            duty=duty,
            lost=lost,
            with_kv=with_kv,
        )
        if grow > 0:  # they start while the pool serves; the switch begins once they can join (advance)
            executor.add_workers(grow)
        else:
            self._prepare(self.pending)

    def _prepare(self, sw: PendingSwitch) -> None:
        self.host.executor.broadcast(PrepareSwitch(sw.switch_id, sw.plan, sw.num_blocks, sw.mode.precopy, sw.duty))

    def advance(self, wait_s: float = 0.0) -> None:
        """Called between steps: cut over once the workers are ready, or finish an abort."""
        sw = self.pending
        if sw is None:
            return
        executor = self.host.executor
        if sw.joining:
            if executor.joining_started():
                executor.regroup(executor.topology)  # a world with the new workers; then the switch
                sw.joining = False
                self._prepare(sw)
            elif time.perf_counter() - sw.t_start > self.timeout_s:
                self.pending = None
                executor.remove_idle(sw.old)
                sw.on_done(None, SwitchAborted(f"the added workers did not start within {self.timeout_s:g} s"))
            return
        progress = executor.switch_progress(sw.switch_id, wait_s)
        n = executor.pool_size
        if sw.abort_reason is None:
            failed = [p for p in progress.values() if p.stage == "failed"]
            if failed:
                self._abort(sw, f"worker {failed[0].rank} failed during pre-copy:\n{failed[0].error}")
            elif time.perf_counter() - sw.t_start > self.timeout_s:
                self._abort(sw, f"the workers were not ready to cut over within {self.timeout_s:g} s")
            elif len(progress) == n and all(p.stage == sw.expect for p in progress.values()):
                # the blocks full of written KV now (append-only: unchanged while their request holds them);
                # oldest requests first, as many as the new pool holds (fit_kv preempts the youngest)
                if sw.expect == "precopied" and (snapshot := self.host.block_owners(True, sw.num_blocks)):
                    sw.kv_snapshot, sw.expect = snapshot, "kv_precopied"
                    blocks = sorted(snapshot)
                    sw.kv_new_ids = new_block_ids(blocks, sw.num_blocks, {}, self.host.blocks_in_use())
                    executor.broadcast(PrecopyKV(sw.switch_id, blocks, [sw.kv_new_ids[b] for b in blocks]))
                else:
                    sw.t_ready = time.perf_counter()
                    self._cut_over(sw)
        elif len(progress) == n and all(p.stage == "aborted" for p in progress.values()):
            self.pending = None
            executor.remove_idle(sw.old)  # workers added for the switch leave again
            sw.on_done(
                None, SwitchAborted(f"switch to {sw.plan.new} called off, still serving {sw.old}: {sw.abort_reason}")
            )

    def _abort(self, sw: PendingSwitch, reason: str) -> None:
        sw.abort_reason = reason
        self.host.executor.broadcast(AbortSwitch(sw.switch_id))

    def _cut_over(self, sw: PendingSwitch) -> None:
        host = self.host
        t_pause = time.perf_counter()
        last_step = host.step_log.last_step_time()
        host.drain()
        if self.pending is not sw:  # a worker was lost meanwhile: the recovery ended this switch
            return
        preempted = host.fit_kv(sw.num_blocks)
        used = host.blocks_in_use()
        clean = sorted(owners_unchanged(sw.kv_snapshot or {}, host.block_owners(False)))
        mapping = new_block_ids(used, sw.num_blocks, {b: sw.kv_new_ids[b] for b in clean}, used)
        new_ids = [mapping[b] for b in used]
        sw.committing = True  # from here the old shards are consumed: a failure is a loss or ends the engine
        with host.fatal_worker_errors() as guard:
            host.executor.broadcast(CommitSwitch(sw.switch_id, used, new_ids, clean))
            progress = host.executor.await_switch(sw.switch_id, {"committed"}, host.args.worker_timeout_s)
            failed = [p for p in progress.values() if p.stage == "failed"]
            if failed:
                raise WorkerError(f"worker {failed[0].rank} failed to commit the switch:\n{failed[0].error}")
        if guard.recovered:
            return
        host.adopt(sw.plan.new, sw.num_blocks, mapping)
        with host.fatal_worker_errors() as guard:
            host.executor.remove_idle(sw.plan.new)  # workers the new topology leaves idle hold nothing now: stop
        if guard.recovered:
            return
        report = self._report(sw, progress, used, clean, preempted, t_pause, time.perf_counter(), last_step)
        self.pending = None
        sw.on_done(report, None)

    def _report(self, sw, progress: dict[int, SwitchProgress], used, clean, preempted, t_pause, t_end, last_step):
        host, plan = self.host, sw.plan
        stats = [progress[r].stats for r in sorted(progress)]
        # KV bytes depend on the blocks in use at the cut-over, not at planning: count with that sizer
        cfg, itemsize, block_size = host.model_config, host.dtype.itemsize, host.args.block_size
        final = make_plan(cfg, sw.old, plan.new, PieceSizer(cfg, itemsize, len(used), block_size), sw.with_kv, sw.lost)
        per_block = PieceSizer(cfg, itemsize, 1, block_size).kv_piece_bytes
        kv_pieces = sum(isinstance(t.piece, KVPiece) and t.src >= 0 for t in plan.transfers)
        precopied = sw.kv_snapshot or {}
        weights_in_pause = 0 if sw.mode.precopy else plan.moved.weights
        before, during = host.step_log.throughput(sw.t_start, sw.t_ready)
        return SwitchReport(
            sw.mode.name,
            str(sw.old),
            str(plan.new),
            wall_s=t_end - sw.t_start,
            pause_s=t_end - t_pause,
            precopy_s=(sw.t_ready - sw.t_start) if sw.mode.precopy else 0.0,
            bytes_moved={"weights": plan.moved.weights, "kv": kv_pieces * len(used) * per_block},
            bytes_moved_in_pause={"weights": weights_in_pause, "kv": kv_pieces * (len(used) - len(clean)) * per_block},
            kv_bytes_stale=kv_pieces * (len(precopied) - len(clean)) * per_block,
            min_bytes={"weights": final.minimum.weights, "kv": final.minimum.kv},
            bytes_kept={"weights": final.kept.weights, "kv": final.kept.kv},
            peak_extra_bytes=max(s.peak_extra_bytes for s in stats),
            peak_extra_bytes_per_worker=[s.peak_extra_bytes for s in stats],
            preempted=[r.request_id for r in preempted],
            kv_blocks_moved=len(used),
            num_kv_blocks=sw.num_blocks,
            executor_bytes_received=sum(s.bytes_received for s in stats),
            worker_seconds={
                k: round(max(s.seconds.get(k, 0.0) for s in stats), 4)
                for k in sorted({k for s in stats for k in s.seconds})
            },
            tokens_per_s_before=before,
            tokens_per_s_during=during,
            longest_step_gap_s=host.step_log.longest_gap(sw.t_start, t_end, last_step),
            fallback=sw.fallback,
            pool_size=host.executor.pool_size,
            bytes_from_checkpoint={"weights": plan.from_checkpoint.weights, "kv": plan.from_checkpoint.kv},
        )
