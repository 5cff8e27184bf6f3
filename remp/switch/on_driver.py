"""The driver's side of a switch, as a state machine the engine advances between its steps.

start: plan (placement over the pool, pieces); if the target needs more workers than the pool has, start them
(they hold nothing) and, once they are up (advance), regroup the pool into a new world with them; then send
PrepareSwitch; the workers create the new groups and, in live mode,
pre-copy the weights while the engine keeps stepping. advance (each step): once every worker is "precopied",
name the KV blocks that are full now (with their owner, to tell later whether they stayed put), decide where
they go (planner/kv_moves.py: which new replica takes each running request, the blocks' new ids) and let the
workers copy them too; once they are "kv_precopied" (live) or "prepared" (stop), cut over: drain the in-flight
micro-batches (the pause starts), decide again (keeping the pre-copy's choices where they still hold; requests
no new replica has room for are preempted), CommitSwitch with the blocks still clean, wait, hand the engine
its new replicas and block tables, stop the workers the new topology leaves idle (the rest regroup), report.
A worker that reports a failure before the cut-over, or a pre-copy that outlives `timeout_s`, aborts the
switch: the workers drop what they staged and the old topology goes on serving. A worker that dies is a
recovery (recovery.py).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from remp.executor import WorkerError
from remp.messages import AbortSwitch, CommitSwitch, PrecopyKV, PrepareSwitch, SwitchProgress
from remp.planner.kv_moves import Key, KVMoves, Move, plan_kv_moves
from remp.planner.mode import STOP, SwitchMode
from remp.planner.plan import KVPiece, PieceSizer, Plan, best_placement, kv_routes, make_plan, staging_bytes
from remp.switch.host import BlockOwner, SwitchHost
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
    kv_snapshot: dict[Key, BlockOwner] | None = None  # pre-copied block (old replica, id) -> its owner then
    precopied: dict[Move, int] = field(default_factory=dict)  # (such a block, a new replica) -> its id there
    assignment: dict[str, int] = field(default_factory=dict)  # running request -> new replica, at the pre-copy
    joining: bool = False  # workers added for this switch have yet to join the world (then PrepareSwitch)
    duty: float = 1.0
    lost: frozenset[int] = frozenset()  # recovery: workers of `old` that are gone
    with_kv: bool = True  # the KV in use moves (not after a loss of KV that only the lost workers held)
    committing: bool = False  # the cut-over's commit was sent: the workers' old shards are being consumed

    def __post_init__(self) -> None:
        self.expect = "precopied" if self.mode.precopy else "prepared"  # the stage that lets it move on


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
        used = [len(host.blocks_in_use(r)) for r in range(old.dp)]
        sizer = PieceSizer(cfg, host.dtype.itemsize, sum(used), block_size)
        grow = target.size - executor.pool_size
        pool = list(range(max(executor.pool_size, target.size)))
        links = executor.links(len(pool)) if self.link_costs else None
        new = best_placement(
            cfg, old, target.tp, target.pp, sizer, target.layers_per_stage, with_kv, pool, links, target.dp
        )
        # the KV of each old replica split evenly over the new replicas it may go to (the real split: cut-over)
        routes = kv_routes(cfg, old, new, lost)
        sizer = sizer.with_blocks({(s, d): -(-used[s] // len(ds)) for s, ds in routes.items() for d in ds})
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
                # the blocks full of written KV now (append-only: unchanged while their request holds them),
                # where the new replicas would take them if the cut-over were now
                if sw.expect == "precopied" and (snapshot := self._owners(sw.old, True)):
                    moves = self._moves(sw)
                    sw.kv_snapshot, sw.expect = snapshot, "kv_precopied"
                    sw.assignment = moves.assignment
                    sw.precopied = {m: n for m, n in moves.destination.items() if m[0] in snapshot}
                    executor.broadcast(PrecopyKV(sw.switch_id, moves.flows(set(sw.precopied))))
                else:
                    sw.t_ready = time.perf_counter()
                    self._cut_over(sw)
        elif len(progress) == n and all(p.stage == "aborted" for p in progress.values()):
            self.pending = None
            executor.remove_idle(sw.old)  # workers added for the switch leave again
            sw.on_done(
                None, SwitchAborted(f"switch to {sw.plan.new} called off, still serving {sw.old}: {sw.abort_reason}")
            )

    def _owners(self, old: Topology, full_only: bool) -> dict[Key, BlockOwner]:
        return {(s, b): o for s in range(old.dp) for b, o in self.host.block_owners(s, full_only).items()}

    def _moves(self, sw: PendingSwitch, fixed: dict[Move, int] | None = None) -> KVMoves:
        """Where each old replica's requests and blocks go now (the pre-copy's choices kept where they can)."""
        host, dp = self.host, sw.old.dp
        running = [host.running(s) for s in range(dp)] if sw.with_kv else [[]] * dp
        cached = [host.cached_free(s) for s in range(dp)] if sw.with_kv else [[]] * dp
        routes = sw.plan.routes or {s: [0] for s in range(dp)}
        return plan_kv_moves(routes, running, cached, sw.num_blocks, sw.assignment, fixed)

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
        now = self._owners(sw.old, False)
        unchanged = {k for k, owner in (sw.kv_snapshot or {}).items() if now.get(k) == owner}
        moves = self._moves(sw, {m: n for m, n in sw.precopied.items() if m[0] in unchanged})
        host.preempt(moves.preempted)
        flows = moves.flows()
        clean: dict[tuple[int, int], list[int]] = {}
        for ((s, b), d), n in sorted(moves.destination.items()):
            if (s, b) in unchanged and sw.precopied.get(((s, b), d)) == n:
                clean.setdefault((s, d), []).append(b)
        sw.committing = True  # from here the old shards are consumed: a failure is a loss or ends the engine
        with host.fatal_worker_errors() as guard:
            host.executor.broadcast(CommitSwitch(sw.switch_id, flows, clean))
            progress = host.executor.await_switch(sw.switch_id, {"committed"}, host.args.worker_timeout_s)
            failed = [p for p in progress.values() if p.stage == "failed"]
            if failed:
                raise WorkerError(f"worker {failed[0].rank} failed to commit the switch:\n{failed[0].error}")
        if guard.recovered:
            return
        host.adopt(sw.plan.new, sw.num_blocks, moves.assignment, moves.block_maps())
        with host.fatal_worker_errors() as guard:
            host.executor.remove_idle(sw.plan.new)  # workers the new topology leaves idle hold nothing now: stop
        if guard.recovered:
            return
        report = self._report(sw, progress, flows, clean, moves.preempted, t_pause, time.perf_counter(), last_step)
        self.pending = None
        sw.on_done(report, None)

    def _report(self, sw, progress: dict[int, SwitchProgress], flows, clean, preempted, t_pause, t_end, last_step):
        host, plan = self.host, sw.plan
        stats = [progress[r].stats for r in sorted(progress)]
        # KV bytes depend on the blocks each route moved at the cut-over, not at planning: count with those
        cfg, itemsize, block_size = host.model_config, host.dtype.itemsize, host.args.block_size
        moved = {route: len(old) for route, (old, _) in flows.items()}
        final = make_plan(cfg, sw.old, plan.new, PieceSizer(cfg, itemsize, moved, block_size), sw.with_kv, sw.lost)
        precopied: dict[tuple[int, int], int] = {}
        for (s, _), d in sw.precopied:
            precopied[(s, d)] = precopied.get((s, d), 0) + 1
        done = {route: len(blocks) for route, blocks in clean.items()}

        def kv_bytes(blocks: dict) -> int:
            sizer = PieceSizer(cfg, itemsize, blocks, block_size)
            return sum(sizer.bytes(t.piece) for t in plan.transfers if isinstance(t.piece, KVPiece) and t.src >= 0)

        weights_in_pause = 0 if sw.mode.precopy else plan.moved.weights
        before, during = host.step_log.throughput(sw.t_start, sw.t_ready)
        return SwitchReport(
            sw.mode.name,
            str(sw.old),
            str(plan.new),
            wall_s=t_end - sw.t_start,
            pause_s=t_end - t_pause,
            precopy_s=(sw.t_ready - sw.t_start) if sw.mode.precopy else 0.0,
            bytes_moved={"weights": plan.moved.weights, "kv": kv_bytes(moved)},
            bytes_moved_in_pause={
                "weights": weights_in_pause,
                "kv": kv_bytes({r: n - done.get(r, 0) for r, n in moved.items()}),
            },
            kv_bytes_stale=kv_bytes({r: n - done.get(r, 0) for r, n in precopied.items()}),
            min_bytes={"weights": final.minimum.weights, "kv": final.minimum.kv},
            bytes_kept={"weights": final.kept.weights, "kv": final.kept.kv},
            peak_extra_bytes=max(s.peak_extra_bytes for s in stats),
            peak_extra_bytes_per_worker=[s.peak_extra_bytes for s in stats],
            preempted=[r.request_id for r in preempted],
            kv_blocks_moved=sum(moved.values()),
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
