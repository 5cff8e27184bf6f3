"""The worker process: holds one shard and its KV slice, runs its part of each step, takes part in switches.

It outlives any one topology. It talks to the driver through a pipe (the typed messages of messages.py) and to
the other workers through torch.distributed.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection

import torch

from remp.messages import (
    HEARTBEAT_S,
    AbortSwitch,
    CommitSwitch,
    Heartbeat,
    PrecopyKV,
    PrepareSwitch,
    Ready,
    Regroup,
    Shutdown,
    StepFailed,
    StepMsg,
    SwitchProgress,
    WorkerFailed,
)
from remp.topology import Topology


@dataclass(frozen=True)
class WorkerConfig:
    model: str | None
    dtype: torch.dtype
    num_blocks: int
    block_size: int
    max_model_len: int
    device: str
    world_size: int
    init_method: str
    timeout_s: float
    threads: int
    shm_name: str | None = None  # shared-memory all-reduce segment (CPU pools on one machine)
    shm_elems: int = 0
    shm_slots: int = 0  # workers the segment has room for (the most the pool may grow to)
    nodes: tuple[int, ...] | None = None  # the node of each rank at start (None: all on one machine)
    device_slot: int | None = None  # which of its machine's GPUs (None: rank modulo the GPUs)


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
    "remp.reshard.on_worker",
]


def start_fork_server() -> mp.context.BaseContext:
    """Start the fork server now (it imports torch in the background while the driver reads the checkpoint
    and the tokenizer); idempotent. Workers start from it (the executor's, or a headless node's agent)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)
    forkserver.ensure_running()
    return ctx


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the driver dies, even by SIGKILL, so no worker is ever orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_device_slot(taken: set[int]) -> int:
    """The lowest GPU slot of a machine that none of its live workers holds (ranks change with the pool;
    devices do not)."""
    return min(set(range(len(taken) + 1)) - taken)


def _device(cfg: WorkerConfig, rank: int) -> torch.device:
    if cfg.device == "cuda":
        slot = cfg.device_slot if cfg.device_slot is not None else rank
        torch.cuda.set_device(slot % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _heartbeat(send, me: list[int], memory) -> None:
    """Runs while the main thread computes or waits in a collective; silent only if the process is stuck.
    `memory()`: the worker's memory by kind now, which each heartbeat carries."""
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            now = memory()
        except Exception:  # an account that fails must not silence the heartbeat: the worker would count as hung
            now = None
        try:
            send(Heartbeat(me[0], now))
        except OSError:  # the driver went away
            return


def worker_main(rank: int, cfg: WorkerConfig, topology: Topology | None, conn: Connection) -> None:
    """topology None: a worker added to a running pool; it holds nothing and joins the world at the Regroup
    that follows (until then it ignores the steps it is sent)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it shuts us down
    torch.set_num_threads(cfg.threads)
    comm = None
    me = [rank]  # this worker's rank changes when the pool does
    lock = threading.Lock()  # the pre-copy thread reports through the same pipe

    def send(msg: object) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with lock:
            conn.send_bytes(data)

    try:
        from remp.comm import WorkerComm
        from remp.memory import MemoryAccount, give_back
        from remp.model.reader import open_checkpoint
        from remp.model_runner import ModelRunner
        from remp.reshard.on_worker import WorkerSwitch
        from remp.shard_state import ShardState
        from remp.shm_allreduce import ShmSegment

        device = _device(cfg, rank)
        shm = ShmSegment(cfg.shm_slots, cfg.shm_elems, cfg.shm_name) if cfg.shm_name else None
        reader = open_checkpoint(cfg.model)
        account = MemoryAccount(device)  # what the process holds before its shard is runtime

        def join(
            rank: int, world_size: int, init_method: str, topology: Topology | None, epoch: int, nodes
        ) -> WorkerComm:
            """topology None (recovery): no routing until the switch that follows installs one."""
            comm = WorkerComm(rank, world_size, init_method, cfg.timeout_s, device, shm, epoch, nodes)
            if topology is not None:
                comm.prepare_topology(topology)
                comm.use_topology(topology, reader.config, cfg.dtype)
            return comm

        if topology is not None:
            comm = join(rank, cfg.world_size, cfg.init_method, topology, 0, cfg.nodes)
        spec = topology.spec(reader.config, rank) if topology is not None else None
        runner = ModelRunner(
            reader, spec, cfg.dtype, cfg.num_blocks, cfg.block_size, cfg.max_model_len, str(device), comm
        )
        give_back(device)  # what loading allocated and freed (checkpoint reads, conversions)
        switch = WorkerSwitch(rank, runner, comm, send, account)
        handlers = {
            PrepareSwitch: switch.prepare,
            PrecopyKV: switch.precopy_kv,
            CommitSwitch: switch.commit,
            AbortSwitch: switch.abort,
        }
        broken = False  # a step failed here: no part in steps until the driver's Regroup
        send(Ready(rank, os.getpid(), 0 if topology is not None else -1))
        memory = lambda: account.measure(runner.held)
        threading.Thread(target=_heartbeat, args=(send, me, memory), name="remp-heartbeat", daemon=True).start()
        while True:
            msg = pickle.loads(conn.recv_bytes())
            if isinstance(msg, StepMsg):
                if runner.spec is None or broken:  # an idle worker has no part in steps
                    continue
                try:
                    with switch.steps:
                        result = runner.run(msg)
                except Exception:  # often a peer lost mid-step: keep the shard, the driver decides
                    broken = True
                    send(StepFailed(me[0], msg.step_id, traceback.format_exc()))
                    continue
                if result is not None:
                    send(result)
            elif isinstance(msg, Regroup):
                switch.reset()  # a switch cut short by a lost worker: drop what it staged
                if comm is not None:
                    comm.close()
                torch.set_num_threads(msg.threads)
                # epochs grow across generations: shared-memory flags of the old world never match the new one
                comm = join(msg.rank, msg.world_size, msg.init_method, msg.topology, msg.generation << 32, msg.nodes)
                me[0], broken = msg.rank, False
                if msg.drop_shard:
                    runner.install(ShardState(None, {}, {}))
                give_back(device)  # the old world's groups, what a cut-short switch staged
                runner.set_comm(comm)
                switch.rank, switch.comm = msg.rank, comm
                send(Ready(msg.rank, os.getpid(), msg.generation))
            elif isinstance(msg, Shutdown):
                break
            else:
                try:
                    handlers[type(msg)](msg)
                except Exception:  # often a peer lost mid-switch: stay up, the driver decides
                    broken = True
                    send(SwitchProgress(me[0], msg.switch_id, "failed", None, traceback.format_exc()))
    except EOFError:
        pass  # the driver went away
    except BaseException:  # report anything, then exit
        try:
            send(WorkerFailed(me[0], traceback.format_exc()))
        except OSError:
            pass
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:  # peers may already be gone
                pass
