"""A worker's side of a switch: the driver's three commands (prepare, commit, abort), for either strategy.

prepare: create the new topology's process groups (steps go on around it); in live mode start the pre-copy
(live.py), which answers "precopied" when the new shard is ready, else answer "prepared". precopy_kv (live):
copy the full KV blocks named, answered "kv_precopied".
commit (the pause): live mode moves the KV and swaps in the shard built during pre-copy; stop mode runs the
whole plan now, chunk by chunk (execute.stop_the_world). Then steps route by the new topology.
abort: drop whatever was staged; the old shard never stopped serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from remp.messages import AbortSwitch, CommitSwitch, PrecopyKV, PrepareSwitch, SwitchProgress, SwitchStats
from remp.model.schema import tensor_layer
from remp.planner.plan import weight_ranges
from remp.reshard.execute import Memory, PieceIO, stop_the_world
from remp.reshard.live import LiveSwitch


class WorkerSwitch:
    def __init__(self, rank: int, runner, comm, send: Callable[[object], None]):
        self.rank, self.runner, self.comm, self.send = rank, runner, comm, send
        self.pending: PrepareSwitch | None = None
        self.live: LiveSwitch | None = None
        self.groups_s = 0.0

    def _progress(self, stage: str, stats: SwitchStats | None = None, error: str | None = None) -> None:
        self.send(SwitchProgress(self.rank, self.pending.switch_id, stage, stats, error))

    def prepare(self, msg: PrepareSwitch) -> None:
        t0 = time.perf_counter()
        self.comm.prepare_topology(msg.plan.new)
        self.groups_s = time.perf_counter() - t0
        self.pending = msg
        if msg.precopy:
            self.live = LiveSwitch(self.rank, msg, self.runner, self.comm.switch_group, self._progress)
            self.live.start()
        else:
            self._progress("prepared")

    def commit(self, msg: CommitSwitch) -> None:
        plan, runner = self.pending.plan, self.runner
        config = runner.reader.config
        new_spec = plan.new.spec(config, self.rank) if plan.new.coordinate(self.rank) is not None else None
        if self.live is not None:
            state, shard, stats = self.live.commit(msg.flows, msg.clean)
        else:
            stats = SwitchStats()
            t0 = time.perf_counter()
            old, reuse = runner.detach(self._unchanged_layers(new_spec))
            io = PieceIO(
                self.rank, config, old, msg.flows, runner.block_size, runner.dtype, runner.device,
                self.comm.switch_group, stats, Memory(stats), runner.reader,
                plan.old.replica_of(self.rank) if plan.old is not None else None, plan.new.replica_of(self.rank),
            )  # fmt: skip
            state = stop_the_world(io, plan, new_spec, self.pending.num_blocks)
            stats.bytes_received_in_pause = stats.bytes_received
            stats.add_time("execute", time.perf_counter() - t0)
            shard = runner.build_shard(new_spec, state.weights, reuse) if new_spec is not None else None
        t0 = time.perf_counter()
        self.comm.use_topology(plan.new, config, runner.dtype)
        runner.install(state, shard)
        stats.add_time("install", time.perf_counter() - t0)
        stats.seconds["groups"] = self.groups_s
        self._progress("committed", stats)
        self.pending = self.live = None

    def precopy_kv(self, msg: PrecopyKV) -> None:
        if self.live is not None and msg.switch_id == self.pending.switch_id:
            self.live.precopy_kv(msg.flows)

    def abort(self, msg: AbortSwitch) -> None:
        if self.pending is None or msg.switch_id != self.pending.switch_id:
            return
        if self.live is not None:
            self.live.abort()
        self._progress("aborted")
        self.pending = self.live = None

    def reset(self) -> None:
        """The pool regroups (a worker was lost, or the pool changed size): a switch still in progress here is
        over; drop what it staged. A pre-copy thread stuck in a collective with a lost worker gets an error
        once this worker's old process groups close, and then ends quietly (it was cancelled)."""
        if self.live is not None:
            self.live.cancel.set()
            self.live.thread.join(timeout=1.0)
            self.live.weights, self.live.kv_targets, self.live.shard = {}, {}, None
        self.pending = self.live = None

    def _unchanged_layers(self, new_spec) -> set[int]:
        """Layers (and -1, the lm-head) whose every tensor this worker holds with the same range before and after:
        their execution form can be taken over as it is."""
        if new_spec is None:
            return set()
        config = self.runner.reader.config
        old, new = weight_ranges(config, self.runner.spec), weight_ranges(config, new_spec)
        changed = {tensor_layer(n) for n in new if old.get(n) != new[n]}
        if self.runner.spec is None or self.runner.spec.vocab != new_spec.vocab:
            changed.add(-1)  # the lm-head is a slice of the tied embedding, which may be held whole either way
        return {i for i in {*new_spec.layers, -1} if i not in changed}
