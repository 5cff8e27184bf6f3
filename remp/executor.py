"""Driver-side executors: run steps on the shard(s) and hand back sampled tokens.

LocalExecutor runs the single shard of a TP1xPP1 engine in-process. MultiprocExecutor starts one worker
process per device/core slice and keeps up to `pp` steps in flight, so with pipeline parallelism every stage
works on a different micro-batch at once. Any worker failure (exception, death, silence past the timeout)
becomes a WorkerError here; the executor then stops every worker.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import pickle
import socket
import time
import weakref
from collections import deque
from multiprocessing import forkserver
from multiprocessing.connection import wait as wait_ready

from remp.model.reader import CheckpointReader
from remp.model_runner import ModelRunner
from remp.shm_allreduce import ShmSegment
from remp.step import StepMsg, StepResult
from remp.topology import Topology
from remp.worker import WorkerConfig, worker_main


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
    max_in_flight = 1

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
        self._results: deque[StepResult] = deque()

    def submit(self, msg: StepMsg) -> None:
        self._results.append(self.runner.run(msg))

    def wait(self) -> StepResult:
        return self._results.popleft()

    def shutdown(self, grace_s: float = 5.0) -> None:
        self._results.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list, conns: list, segment: ShmSegment | None = None, grace_s: float = 5.0) -> None:
    for c in conns:
        try:
            c.send_bytes(pickle.dumps(("shutdown", None)))
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


# Workers fork from multiprocessing's fork server, which imports these once (torch alone takes seconds per
# process): a worker starts in a fraction of a second, which matters for restarts and replacements as much as
# for start-up. The fork server is single-threaded and never touches a device, so forking it is safe; being
# started once per driver, it passes its environment (not the driver's current one) to every worker.
WORKER_MODULES = [
    "remp.worker",
    "remp.comm",
    "remp.model_runner",
    "remp.model.gguf_reader",
    "remp.model.safetensors_reader",
]


class MultiprocExecutor:
    def __init__(self, topology: Topology, cfg: WorkerConfig, startup_timeout_s: float = 300.0):
        self.topology = topology
        self.timeout_s = cfg.timeout_s
        self.max_in_flight = topology.pp
        ctx = self.prestart()
        self.procs, self.conns = [], []
        self.segment = None
        if cfg.device == "cpu" and cfg.shm_elems and cfg.world_size > 1:  # one worker never all-reduces
            self.segment = ShmSegment(cfg.world_size, cfg.shm_elems)
            cfg = dataclasses.replace(cfg, shm_name=self.segment.name)
        for rank in range(cfg.world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(rank, cfg, topology, child), daemon=True, name=f"remp-worker-{rank}"
            )
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self.segment)
        try:
            self._await_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    @staticmethod
    def prestart() -> mp.context.BaseContext:
        """Start the fork server now (it imports torch in the background while the driver reads the checkpoint
        and the tokenizer); idempotent."""
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_MODULES)
        forkserver.ensure_running()
        return ctx

    @staticmethod
    def worker_config(world_size: int, **kwargs) -> WorkerConfig:
        return WorkerConfig(
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            threads=max(1, (os.cpu_count() or 1) // world_size),
            **kwargs,
        )

    def _describe(self, rank: int) -> str:
        coord = self.topology.coordinate(rank)
        where = f" (stage {coord[0]}, tp rank {coord[1]})" if coord else ""
        return f"worker {rank}{where}"

    def _died(self, rank: int) -> WorkerError:
        self.procs[rank].join(1.0)
        code = self.procs[rank].exitcode
        if code == EXIT_UNGUARDED_MAIN:
            return WorkerError(UNGUARDED_MAIN_MESSAGE)
        return WorkerError(f"{self._describe(rank)} died (exit code {code})")

    def _recv(self, rank: int) -> tuple:
        """The next message from a worker; an error report or a closed pipe becomes WorkerError."""
        try:
            msg = self.conns[rank].recv()
        except (EOFError, OSError):
            raise self._died(rank) from None
        if msg[0] == "error":
            raise WorkerError(f"{self._describe(msg[1])} failed:\n{msg[2]}")
        return msg

    def _raise_for(self, ready: list) -> None:
        """Something other than the awaited message woke us: turn it into the WorkerError it means."""
        for rank, c in enumerate(self.conns):
            if c in ready:
                msg = self._recv(rank)
                raise WorkerError(f"unexpected message {msg[0]!r} from {self._describe(rank)}")
        for rank, p in enumerate(self.procs):
            if p.sentinel in ready:
                raise self._died(rank)

    def _await_ready(self, timeout_s: float) -> None:
        waiting = set(range(len(self.procs)))
        deadline = time.monotonic() + timeout_s
        while waiting:
            left = deadline - time.monotonic()
            ready = wait_ready([self.conns[r] for r in waiting] + [p.sentinel for p in self.procs], max(left, 0))
            if not ready:
                raise WorkerError(f"workers {sorted(waiting)} did not start within {timeout_s:.0f} s")
            for rank in list(waiting):
                if self.conns[rank] in ready:
                    msg = self._recv(rank)
                    if msg[0] != "ready":
                        raise WorkerError(f"unexpected message {msg[0]!r} from {self._describe(rank)}")
                    waiting.discard(rank)
            dead = [r for r in ready if r not in self.conns]
            if dead:
                self._raise_for(dead)

    def submit(self, msg: StepMsg) -> None:
        data = pickle.dumps(("step", msg), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, c in enumerate(self.conns):
            try:
                c.send_bytes(data)
            except OSError as e:
                raise WorkerError(f"{self._describe(rank)} is unreachable: {e}") from None

    def wait(self) -> StepResult:
        """The oldest in-flight step's result (results come back in submission order)."""
        rank = self.topology.sampler_worker
        ready = wait_ready(self.conns + [p.sentinel for p in self.procs], self.timeout_s)
        if not ready:
            raise WorkerError(f"no result from {self._describe(rank)} within {self.timeout_s:.0f} s: a worker hangs")
        if self.conns[rank] in ready:
            msg = self._recv(rank)
            if msg[0] == "result":
                return msg[1]
            raise WorkerError(f"unexpected message {msg[0]!r} from {self._describe(rank)}")
        self._raise_for(ready)
        raise WorkerError("woken without a result or an error")  # not reached

    def reconfigure(self, plan, used_blocks: list[int], new_block_ids: list[int], new_num_blocks: int) -> list:
        """Every worker executes its part of the plan; returns their ReshardStats (by rank). The old topology is
        consumed as the workers go: a failure here leaves the engine in an error state, never half-switched."""
        payload = ("reconfigure", (plan, used_blocks, new_block_ids, new_num_blocks))
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, c in enumerate(self.conns):
            try:
                c.send_bytes(data)
            except OSError as e:
                raise WorkerError(f"{self._describe(rank)} is unreachable: {e}") from None
        stats: dict[int, object] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(stats) < len(self.conns):
            ready = wait_ready(self.conns + [p.sentinel for p in self.procs], max(0, deadline - time.monotonic()))
            if not ready:
                missing = sorted(set(range(len(self.conns))) - set(stats))
                raise WorkerError(f"workers {missing} did not finish the switch within {self.timeout_s:.0f} s")
            for rank, c in enumerate(self.conns):
                if c in ready:
                    msg = self._recv(rank)
                    if msg[0] != "reconfigured":
                        raise WorkerError(f"unexpected message {msg[0]!r} from {self._describe(rank)}")
                    stats[rank] = msg[2]
            dead = [p.sentinel for p in self.procs if p.sentinel in ready and not p.is_alive()]
            if dead:
                self._raise_for(dead)
        self.topology = plan.new
        self.max_in_flight = plan.new.pp
        return [stats[r] for r in range(len(self.conns))]

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Ask every worker to stop; kill those still running after grace_s. Idempotent."""
        state = self._finalizer.detach()
        if state is not None:
            _stop(*state[2], grace_s=grace_s)
