"""The worker process: holds one shard and its KV slice, runs its part of each step, takes part in switches.

It outlives any one topology. It talks to the driver through a pipe (the typed messages of messages.py) and to
the other workers through torch.distributed.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from remp.messages import (
    AbortSwitch,
    CommitSwitch,
    PrecopyKV,
    PrepareSwitch,
    Ready,
    Shutdown,
    StepMsg,
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


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the driver dies, even by SIGKILL, so no worker is ever orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _device(cfg: WorkerConfig, rank: int) -> torch.device:
    if cfg.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def worker_main(rank: int, cfg: WorkerConfig, topology: Topology, conn: Connection) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it shuts us down
    torch.set_num_threads(cfg.threads)
    comm = None
    lock = threading.Lock()  # the pre-copy thread reports through the same pipe

    def send(msg: object) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with lock:
            conn.send_bytes(data)

    try:
        from remp.comm import WorkerComm
        from remp.model.reader import open_checkpoint
        from remp.model_runner import ModelRunner
        from remp.shm_allreduce import ShmSegment
        from remp.switch.on_worker import WorkerSwitch

        device = _device(cfg, rank)
        shm = ShmSegment(cfg.world_size, cfg.shm_elems, cfg.shm_name) if cfg.shm_name else None
        comm = WorkerComm(rank, cfg.world_size, cfg.init_method, cfg.timeout_s, device, shm)
        reader = open_checkpoint(cfg.model)
        comm.prepare_topology(topology)
        comm.use_topology(topology, reader.config.hidden_size, cfg.dtype)
        runner = ModelRunner(
            reader,
            topology.spec(reader.config, rank),
            cfg.dtype,
            cfg.num_blocks,
            cfg.block_size,
            cfg.max_model_len,
            str(device),
            comm,
        )
        switch = WorkerSwitch(rank, runner, comm, send)
        handlers = {
            PrepareSwitch: switch.prepare,
            PrecopyKV: switch.precopy_kv,
            CommitSwitch: switch.commit,
            AbortSwitch: switch.abort,
        }
        send(Ready(rank, os.getpid()))
        while True:
            msg = pickle.loads(conn.recv_bytes())
            if isinstance(msg, StepMsg):
                result = runner.run(msg)
                if result is not None:
                    send(result)
            elif isinstance(msg, Shutdown):
                break
            else:
                handlers[type(msg)](msg)
    except EOFError:
        pass  # the driver went away
    except BaseException:  # report anything, then exit
        try:
            send(WorkerFailed(rank, traceback.format_exc()))
        except OSError:
            pass
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:  # peers may already be gone
                pass
