"""Driver-side executors: run steps on the shard(s) and hand back sampled tokens.

LocalExecutor runs the single shard of a TP1xPP1 engine in-process. MultiprocExecutor runs a pool of worker
processes (one per device/core slice) and keeps up to `pp` steps in flight, so with pipeline parallelism every
stage works on a different micro-batch at once. The pool can grow and shrink: each change of size is a new
generation of the torch.distributed world (a new rendezvous; ranks stay dense, 0..n-1). Any worker failure
(exception, death, silence past the timeout) becomes a WorkerError here; the executor then stops every worker.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import pickle
import time
import weakref
from collections.abc import Collection
from multiprocessing.connection import wait as wait_ready

from remp.messages import (
    HEARTBEAT_S,
    Ready,
    Regroup,
    Shutdown,
    StepFailed,
    StepMsg,
    StepResult,
    SwitchProgress,
    WorkerFailed,
)
from remp.model.checkpoint import CheckpointReader
from remp.model_runner import ModelRunner
from remp.multinode.head import NODE_LOST_S, ClusterHost
from remp.multinode.link import RemoteProcess
from remp.nodes import INTER_NODE_BPS, INTRA_NODE_BPS, Links
from remp.rendezvous import Rendezvous
from remp.shm_allreduce import ShmSegment
from remp.topology import Topology
from remp.worker import WorkerConfig, free_device_slot, start_fork_server, worker_main


class WorkerError(RuntimeError):
    """A worker died, failed or stopped answering; the engine cannot continue in this topology."""


# Each worker imports the script that started the engine (multiprocessing does, for spawn and forkserver). A
# script that creates an engine at import time (no `if __name__ == "__main__":`) would start one inside every
# worker; such a worker exits with this code instead (see exit_if_spawning_worker), and the driver says why.
EXIT_UNGUARDED_MAIN = 86
UNGUARDED_MAIN_MESSAGE = (
    "the worker processes re-ran the script that created the engine: multiprocessing imports the main module "
    "in each worker it starts. Put the code that creates the engine under "
    "`if __name__ == \"__main__\":` (needed whenever tp*pp > 1 or distributed_executor_backend='mp')"
)


def exit_if_spawning_worker() -> None:
    """Called first when an engine is created: inside a worker that is still importing the main module (the
    state in which multiprocessing forbids starting processes), leave quietly with EXIT_UNGUARDED_MAIN."""
    if getattr(mp.current_process(), "_inheriting", False):
        os._exit(EXIT_UNGUARDED_MAIN)  # not SystemExit: the fork server maps that to exit code 1


class LocalExecutor:
    max_in_flight = 1  # per replica

    def __init__(self, reader: CheckpointReader, topology: Topology, cfg: WorkerConfig):
        self.topology = topology
        self.runner = ModelRunner(
            reader,
            topology.spec(reader.config, 0),
            cfg.dtype,
            cfg.num_blocks,
            cfg.block_size,
            cfg.max_model_len,
            cfg.device,
        )
        self._results: dict[int, StepResult] = {}

    def submit(self, msg: StepMsg, replica: int = 0) -> None:
        self._results[msg.step_id] = self.runner.run(msg)

    def wait(self, step_ids: Collection[int]) -> StepResult:
        return self._results.pop(next(i for i in step_ids if i in self._results))

    def shutdown(self, grace_s: float = 5.0) -> None:
        self._results.clear()


def _stop(
    procs: list,
    conns: list,
    segment: ShmSegment | None = None,
    cluster: ClusterHost | None = None,
    grace_s: float = 5.0,
) -> None:
    for c in conns:
        try:
            c.send_bytes(pickle.dumps(Shutdown()))
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for c in conns:
        c.close()
    if segment is not None:
        segment.close(unlink=True)
    if cluster is not None:
        cluster.shutdown()


class MultiprocExecutor:
    def __init__(
        self,
        topology: Topology,
        cfg: WorkerConfig,
        startup_timeout_s: float = 300.0,
        cluster: ClusterHost | None = None,
        link_Bps: tuple[float, float] = (INTRA_NODE_BPS, INTER_NODE_BPS),
    ):
        """`cluster`: workers on other nodes too (this node's first, then each node's in node order); the
        topology's workers are the whole pool. link_Bps: the planner's intra- and inter-node bandwidths."""
        self.topology = topology
        self.cluster, self.link_Bps = cluster, link_Bps
        self.nodes: list[int] = []  # nodes[rank]: the node a worker runs on (0: this one)
        self._wids = 0  # worker ids: fixed for a worker's life (its rank changes with the pool)
        self.timeout_s = cfg.timeout_s
        self.max_in_flight = topology.pp  # per replica
        self.generation = 0
        self._recovering = False  # steps failing because of a lost worker are expected, not new failures
        # a worker silent this long (no heartbeat, no reply) is hung: it is treated as lost
        self.hang_s = min(cfg.timeout_s, max(5.0, 4 * HEARTBEAT_S))
        self._heard: dict = {}  # pipe -> when it last had something to say
        self._results: dict[int, StepResult] = {}  # step id -> result, until the engine takes it
        self._progress: dict[int, dict[int, SwitchProgress]] = {}  # switch id -> rank -> latest progress
        self._ready: dict[int, set[int]] = {}  # generation (-1: started, waiting to join) -> ranks
        self.procs, self.conns = [], []
        layout = [0] * cfg.world_size
        if cluster is not None:
            layout = [n for n in sorted(cluster.nodes) for _ in range(cluster.nodes[n].workers)]
            if len(layout) != cfg.world_size:
                cluster.shutdown()
                per_node = {n: i.workers for n, i in cluster.nodes.items()}
                raise ValueError(f"{topology} needs {cfg.world_size} workers; the nodes have {per_node}")
            cfg = dataclasses.replace(cfg, nodes=tuple(layout))
        self.rendezvous = cluster.rendezvous if cluster is not None else Rendezvous(timeout_s=cfg.timeout_s)
        cfg = dataclasses.replace(cfg, init_method=self.rendezvous.url(0))
        self.segment = None
        slots = max(cfg.world_size, cfg.shm_slots)
        if cfg.device == "cpu" and cfg.shm_elems and slots > 1:  # one worker never all-reduces
            self.segment = ShmSegment(slots, cfg.shm_elems)  # a slot for every worker the pool may have
            cfg = dataclasses.replace(cfg, shm_name=self.segment.name, shm_slots=slots)
        self.cfg = cfg
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self.segment, cluster)
        try:
            for rank, node in enumerate(layout):
                self._spawn(rank, topology, node)
            self._await_ready(0, startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self, rank: int, topology: Topology | None, node: int = 0) -> None:
        self._wids += 1
        if node != 0:
            parent, p = self.cluster.spawn(node, self._wids, rank, self.cfg, topology)
        else:
            slot = free_device_slot({q.device_slot for q, n in zip(self.procs, self.nodes) if n == 0 and q.is_alive()})
            parent, child = start_fork_server().Pipe()
            cfg = dataclasses.replace(self.cfg, device_slot=slot)
            p = start_fork_server().Process(
                target=worker_main, args=(rank, cfg, topology, child), daemon=True, name=f"remp-worker-{rank}"
            )
            p.device_slot = slot
            p.start()
            child.close()
        self.procs.append(p)
        self.conns.append(parent)
        self.nodes.append(node)
        self._heard[parent] = float("inf")  # not watched until it has started (the start-up timeout covers that)

    def links(self, pool_size: int | None = None) -> Links:
        """The pool's nodes and link bandwidths, for the planner; with pool_size beyond the pool's, the nodes
        add_workers would start the extra workers on."""
        nodes = list(self.nodes)
        while len(nodes) < (pool_size or 0):
            nodes.append(self._roomiest_node(nodes))
        return Links(tuple(nodes), *self.link_Bps)

    def _roomiest_node(self, nodes: list[int]) -> int:
        """Where a new worker goes: the node furthest below the workers it started with (this node on ties),
        among those not lost."""
        if self.cluster is None:
            return 0
        count = {n: nodes.count(n) - info.workers for n, info in self.cluster.nodes.items()}  # nodes not lost
        return min(count, key=lambda n: (count[n], n))

    def _threads(self, node: int) -> int:
        cpus = self.cluster.nodes[node].cpus if self.cluster is not None else (os.cpu_count() or 1)
        return max(1, cpus // max(1, self.nodes.count(node)))

    @property
    def pool_size(self) -> int:
        return len(self.procs)

    # ---- the pool grows and shrinks ---------------------------------------------------------------------
    def add_workers(self, n: int) -> None:
        """Start n workers that hold nothing; they join the world at the next regroup() (steps go on)."""
        for _ in range(n):
            self._spawn(len(self.procs), None, self._roomiest_node(self.nodes))

    def joining_started(self) -> bool:
        """Whether every worker added since the last regroup has started (and can join)."""
        waiting = set(range(len(self.procs))) - self._ready.get(self.generation, set())
        self._pump(0)
        return waiting <= self._ready.get(-1, set())

    def regroup(self, topology: Topology | None, drop_shards: bool = False) -> None:
        """A new generation of the world with every worker in the pool, ranks 0..n-1 as now; queued behind the
        steps already sent. `topology` is the current one, in these ranks (None: none yet, after a loss)."""
        self.generation += 1
        self._ready.pop(-1, None)  # those that waited to join are in now; ranks may be reused later
        init_method = self.rendezvous.url(self.generation)
        nodes = tuple(self.nodes)
        for rank in range(len(self.procs)):
            threads = self._threads(self.nodes[rank])
            msg = Regroup(self.generation, rank, len(self.procs), init_method, topology, threads, drop_shards, nodes)
            self._send(rank, msg)
        if topology is not None:
            self.topology = topology

    # ---- a worker lost -------------------------------------------------------------------------------------
    def lost_workers(self, wait_s: float) -> list[int]:
        """Ranks whose process has exited, waiting up to wait_s for one (a survivor's report of a failed step
        can arrive before the death is seen). Hung workers (silent past hang_s) are killed first: lost too."""
        now = time.monotonic()
        for rank, p in enumerate(self.procs):
            if now - self._heard[self.conns[rank]] > self.hang_s:
                p.kill()
                p.join(2.0)
        if self.cluster is not None:  # a lost node reports nothing: it is known by its silence
            wait_s = max(wait_s, NODE_LOST_S + HEARTBEAT_S)
        deadline = time.monotonic() + wait_s
        while True:
            if self.cluster is not None:
                self.cluster.mark_silent_nodes_lost()
            lost = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
            if lost or time.monotonic() >= deadline:
                return lost
            wait_ready([p.sentinel for p in self.procs], min(0.05, max(0.0, deadline - time.monotonic())))

    def drop_lost(self, lost: list[int], respawn: bool, timeout_s: float, drop_shards: bool) -> dict[int, int]:
        """Forget the lost workers, free the survivors from any wait on them, optionally start replacements,
        and regroup: a new world of survivors (ranks renumbered in order; replacements last) with no routing
        until a switch installs a topology; with drop_shards they also let go of what they hold. Returns old
        rank -> new rank of the survivors."""
        self._recovering = True
        try:
            if self.segment is not None:
                self.segment.peer_lost()  # survivors spinning in a shared-memory all-reduce give up
            if self.cluster is not None:
                self.cluster.peer_lost()  # and those on the other nodes
            survivors = [r for r in range(len(self.procs)) if r not in lost]
            for r in lost:
                self.procs[r].join(1.0)
                self.conns[r].close()
                self._heard.pop(self.conns[r], None)
            self._keep(survivors)
            if respawn:
                self.add_workers(len(lost))
                deadline = time.monotonic() + timeout_s
                while not self.joining_started():
                    if time.monotonic() > deadline:
                        names = self._describe_all(range(len(survivors), len(self.procs)))
                        raise WorkerError(f"replacement {names} did not start within {timeout_s:.0f} s")
                    self._pump(0.05)
            self.regroup(None, drop_shards)
            self._await_ready(self.generation, timeout_s)  # reads what survivors sent before: stale now
            self._results.clear()
            self._progress.clear()
        finally:
            self._recovering = False
        return {old: new for new, old in enumerate(survivors)}

    def remove_idle(self, topology: Topology) -> Topology:
        """Stop the workers `topology` leaves idle and regroup the others with dense ranks; returns `topology`
        in the new ranks. Called in a switch's pause, after the idle workers handed over what they held."""
        keep = sorted(topology.placement)
        if len(keep) == len(self.procs):
            return topology
        leaving = [r for r in range(len(self.procs)) if r not in keep]
        for r in leaving:
            self._send(r, Shutdown())
        rank_of = {old: new for new, old in enumerate(keep)}
        gone = [(self.procs[r], self.conns[r]) for r in leaving]
        self._keep(keep)
        renumbered = dataclasses.replace(topology, placement=tuple(rank_of[w] for w in topology.placement))
        self.regroup(renumbered)
        for p, c in gone:  # they left the old world: no peer waits for them
            p.join(self.timeout_s)
            if p.is_alive():
                p.kill()
                p.join(2.0)
            c.close()
            self._heard.pop(c, None)
        self._await_ready(self.generation, self.timeout_s)
        return renumbered

    @staticmethod
    def worker_config(world_size: int, **kwargs) -> WorkerConfig:
        """`shm_slots` in kwargs: the most workers the pool may grow to."""
        return WorkerConfig(
            world_size=world_size,
            init_method="",  # the executor's rendezvous
            threads=max(1, (os.cpu_count() or 1) // world_size),
            **kwargs,
        )

    def _keep(self, ranks: list[int]) -> None:
        """Only these workers stay in the pool, renumbered in this order (the lists indexed by rank, together)."""
        for per_rank in (self.procs, self.conns, self.nodes):
            per_rank[:] = [per_rank[r] for r in ranks]

    def _describe_all(self, ranks) -> str:
        return ", ".join(self._describe(r) for r in ranks)

    def _describe(self, rank: int) -> str:
        coord = self.topology.coordinate(rank)
        where = f" (stage {coord[0]}, tp rank {coord[1]})" if coord else ""
        if self.cluster is not None and rank < len(self.nodes):
            node = self.cluster.nodes.get(self.nodes[rank])
            where += f" on node {self.nodes[rank]}" + (f" ({node.host}, {node.address})" if node else "")
        return f"worker {rank}{where}"

    def _died(self, rank: int) -> WorkerError:
        self.procs[rank].join(1.0)
        code = self.procs[rank].exitcode
        if code == EXIT_UNGUARDED_MAIN:
            return WorkerError(UNGUARDED_MAIN_MESSAGE)
        return WorkerError(f"{self._describe(rank)} died (exit code {code})")

    def _pump(self, timeout_s: float) -> bool:
        """Read what the workers have sent within timeout_s into the result and progress queues; a failure
        report, a closed pipe or a dead process becomes WorkerError. False if nothing came."""
        ready = wait_ready(self.conns + [p.sentinel for p in self.procs], min(max(timeout_s, 0), HEARTBEAT_S))
        now = time.monotonic()
        for rank, c in enumerate(self.conns):
            if c not in ready:
                if now - self._heard[c] > self.hang_s:
                    raise WorkerError(
                        f"{self._describe(rank)} stopped answering ({now - self._heard[c]:.1f} s): it hangs"
                    )
                continue
            try:
                msg = pickle.loads(c.recv_bytes())
            except (EOFError, OSError):
                raise self._died(rank) from None
            self._heard[c] = now
            if isinstance(msg, StepResult):
                self._results[msg.step_id] = msg
            elif isinstance(msg, SwitchProgress):
                self._progress.setdefault(msg.switch_id, {})[msg.rank] = msg
            elif isinstance(msg, Ready):
                self._ready.setdefault(msg.generation, set()).add(msg.rank)
                if isinstance(self.procs[rank], RemoteProcess):
                    self.procs[rank].pid = msg.pid  # its pid on its own node (for logs, and tests that kill it)
                if msg.generation > 0 and len(self._ready[msg.generation]) == len(self.procs):
                    self.rendezvous.forget_generations_before(msg.generation)  # every worker left them
            # Heartbeat: only that it came (above)
            elif isinstance(msg, WorkerFailed):
                raise WorkerError(f"{self._describe(msg.rank)} failed:\n{msg.traceback}")
            elif isinstance(msg, StepFailed) and not self._recovering:  # while recovering: the known loss
                raise WorkerError(f"{self._describe(msg.rank)} failed in step {msg.step_id}:\n{msg.traceback}")
        for rank, p in enumerate(self.procs):
            if p.sentinel in ready:
                raise self._died(rank)
        return bool(ready)

    def poll(self) -> None:
        """Read what has arrived; a lost worker raises WorkerError."""
        while self._pump(0):
            pass

    def _await_ready(self, generation: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._ready.get(generation, ())) < len(self.procs):
            if self.cluster is not None:
                self.cluster.mark_silent_nodes_lost()  # their workers' exits end the wait (_pump: "died")
            if not self._pump(deadline - time.monotonic()) and time.monotonic() >= deadline:
                waiting = sorted(set(range(len(self.procs))) - self._ready.get(generation, set()))
                raise WorkerError(f"{self._describe_all(waiting)} did not start within {timeout_s:.0f} s")

    def _send(self, rank: int, msg: object, data: bytes | None = None) -> None:
        try:
            self.conns[rank].send_bytes(data or pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            raise WorkerError(f"{self._describe(rank)} is unreachable: {e}") from None

    def broadcast(self, msg: object) -> None:
        """The same command to every worker (pickled once)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in range(len(self.conns)):
            self._send(rank, msg, data)

    def submit(self, msg: StepMsg, replica: int = 0) -> None:
        """A step of one replica, to its workers (pickled once)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in self.topology.replica_workers(replica):
            self._send(rank, msg, data)

    def wait(self, step_ids: Collection[int]) -> StepResult:
        """The result of whichever of these steps (in flight) finishes first. Within a replica results come
        back in submission order; replicas run side by side."""
        deadline = time.monotonic() + self.timeout_s
        while not (done := [i for i in step_ids if i in self._results]):
            if not self._pump(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise WorkerError(f"no step result within {self.timeout_s:.0f} s: a worker hangs")
        return self._results.pop(done[0])

    def switch_progress(self, switch_id: int, wait_s: float = 0.0) -> dict[int, SwitchProgress]:
        """The latest progress of each worker in a switch, after reading what arrived within wait_s."""
        self._pump(wait_s)
        while self._pump(0):
            pass
        return dict(self._progress.get(switch_id, {}))

    def await_switch(self, switch_id: int, stages: set[str], timeout_s: float) -> dict[int, SwitchProgress]:
        """Block until every worker reports one of `stages` (or "failed") for this switch."""
        deadline = time.monotonic() + timeout_s
        while True:
            progress = self.switch_progress(switch_id)
            if len(progress) == len(self.procs) and all(p.stage in stages | {"failed"} for p in progress.values()):
                return progress
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(
                    r for r in range(len(self.procs)) if r not in progress or progress[r].stage not in stages
                )
                raise WorkerError(f"{self._describe_all(missing)} did not finish the switch within {timeout_s:.0f} s")
            self._pump(min(left, 0.5))

    def use_topology(self, topology: Topology) -> None:
        self.topology = topology
        self.max_in_flight = topology.pp

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Ask every worker to stop; kill those still running after grace_s. Idempotent."""
        state = self._finalizer.detach()
        if state is not None:
            _stop(*state[2], grace_s=grace_s)
