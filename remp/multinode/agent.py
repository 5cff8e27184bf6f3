"""A node without the engine (`remp serve --headless --node-rank K ...`): it joins the head node's store, then
starts, bridges and kills workers as the head asks, and reports their exits. It exits when the head says so or
goes away (its store connection drops), taking its workers with it: none is ever orphaned."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import socket
import threading
import time

import torch.distributed as dist

from remp.logger import init_logger
from remp.messages import HEARTBEAT_S
from remp.multinode.head import HEAD_LOST_S
from remp.multinode.link import CLOSE, blocking_client, pump, send_framed
from remp.multinode.net import bind_gloo_toward, interface_toward
from remp.multinode.protocol import (
    REGISTER,
    KillWorker,
    NodeAlive,
    NodeInfo,
    NodeUnreachable,
    PeerLost,
    PeerLostDone,
    SpawnWorker,
    StopNode,
    WorkerExited,
    agent_queue,
    link_queues,
    node_up_queue,
    rank_claim,
)

logger = init_logger(__name__)


class NodeAgent:
    def __init__(self, node_rank: int, master_addr: str, master_port: int, workers: int, connect_timeout_s: float):
        if node_rank < 1:
            raise ValueError(f"a headless node has node rank 1 or more (0 is the head), got {node_rank}")
        self.node, self.workers = node_rank, workers
        ifname = bind_gloo_toward(master_addr)
        self.address = interface_toward(master_addr)[1]
        from remp.worker import start_fork_server  # the fork server starts with the interface chosen above

        self.ctx = start_fork_server()
        try:
            self.store = dist.TCPStore(
                master_addr, master_port, is_master=False, timeout=datetime.timedelta(seconds=connect_timeout_s)
            )
        except (dist.DistError, RuntimeError) as e:
            raise NodeUnreachable(
                f"node {node_rank}: no head node answered at {master_addr}:{master_port} within "
                f"{connect_timeout_s:.0f} s ({e})"
            ) from None
        token = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
        if self.store.compare_set(rank_claim(node_rank), "", token).decode() != token:
            raise NodeUnreachable(f"node rank {node_rank} is taken: another node joined the head under it")
        self.procs: dict[int, object] = {}  # wid -> its Process, while it runs
        self.exits: dict[int, threading.Event] = {}  # wid -> set once its watch thread has seen it exit
        self.segment = None
        self.reporter = self.store.clone()  # the control loop's answers (PeerLostDone)
        self._closed = threading.Event()
        info = NodeInfo(node_rank, socket.gethostname(), os.cpu_count() or 1, workers, self.address)
        self.store.queue_push(REGISTER, pickle.dumps(info))
        logger.info("node %d joined the head at %s:%d (gloo on %s)", node_rank, master_addr, master_port, ifname)
        threading.Thread(target=self._heartbeat, name="remp-node-alive", daemon=True).start()

    def _heartbeat(self) -> None:
        beat = self.store.clone()
        while not self._closed.is_set():
            try:
                self._tell_head(beat, NodeAlive(self.node))
            except dist.DistError as e:
                if not self._closed.is_set():
                    logger.warning("node %d: heartbeat to the head stopped: %s", self.node, e)
                return  # the control loop sees the head gone too
            self._closed.wait(HEARTBEAT_S)

    def _tell_head(self, client: dist.Store, msg: object) -> None:
        """On this node's queue to the head; `client` is the calling thread's own connection."""
        send_framed(client, node_up_queue(self.node), pickle.dumps(msg))

    def close(self) -> None:
        """Stop this node's heartbeat (run() does, as it ends)."""
        self._closed.set()

    def run(self) -> int:
        """Serve the head's commands until it stops us (0) or is gone (1)."""
        control = self.store.clone()
        control.set_timeout(datetime.timedelta(seconds=HEAD_LOST_S))
        heard = False
        try:
            while True:
                try:
                    msg = pickle.loads(control.queue_pop(agent_queue(self.node)))
                except dist.DistStoreError:  # not even its heartbeat
                    why = "has been silent" if heard else "never answered this node (it takes nodes only at start)"
                    logger.error(
                        "node %d: the head node %s for %.0f s; stopping this node's workers",
                        self.node,
                        why,
                        HEAD_LOST_S,
                    )
                    return 1
                except (dist.DistError, OSError):
                    logger.error("node %d: the head node is gone; stopping this node's workers", self.node)
                    return 1
                heard = True
                if isinstance(msg, SpawnWorker):
                    self._spawn(msg)
                elif isinstance(msg, KillWorker) and msg.wid in self.procs:
                    self.procs[msg.wid].kill()  # a signal only: the watch thread alone waits for the process
                elif isinstance(msg, PeerLost):
                    if self.segment is not None:
                        self.segment.peer_lost()
                    self._tell_head(self.reporter, PeerLostDone(self.node, msg.seq))
                elif isinstance(msg, StopNode):
                    return 0
        finally:
            self.close()
            self._stop_all()

    def _spawn(self, msg: SpawnWorker) -> None:
        from remp.shm_allreduce import ShmSegment
        from remp.worker import free_device_slot, worker_main

        cfg = msg.cfg
        if cfg.device == "cpu" and cfg.shm_elems and cfg.shm_slots > 1 and self.segment is None:
            self.segment = ShmSegment(cfg.shm_slots, cfg.shm_elems)  # this node's: the head's is not reachable
        live = [p for wid, p in self.procs.items() if not self.exits[wid].is_set()]
        slot = free_device_slot({p.device_slot for p in live})
        cfg = dataclasses.replace(
            cfg,
            device_slot=slot,
            threads=max(1, (os.cpu_count() or 1) // max(self.workers, len(live) + 1)),
            shm_name=self.segment.name if self.segment is not None else None,
        )
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(
            target=worker_main, args=(msg.rank, cfg, msg.topology, child), daemon=True, name=f"remp-worker-{msg.wid}"
        )
        p.device_slot = slot
        p.start()
        child.close()
        self.procs[msg.wid], self.exits[msg.wid] = p, threading.Event()
        down, up = link_queues(msg.wid)
        sender = self.store.clone()

        def closed() -> None:  # the worker is gone; so is the pipe
            try:
                parent.close()
            except OSError:
                pass

        pump(blocking_client(self.store), down, parent.send_bytes, closed)

        def forward_up() -> None:
            try:
                while True:
                    send_framed(sender, up, parent.recv_bytes())
            except (EOFError, OSError, dist.DistError):
                pass
            try:  # the driver's link ends too, and our pump of its commands
                sender.queue_push(up, CLOSE)
                sender.queue_push(down, CLOSE)
            except dist.DistError:
                pass

        reporter = self.store.clone()

        def watch() -> None:  # the one thread that waits for the process (two would race for its exit code)
            p.join()
            code = p.exitcode
            self.exits[msg.wid].set()
            try:
                self._tell_head(reporter, WorkerExited(msg.wid, code))
            except dist.DistError:
                pass

        threading.Thread(target=forward_up, name=f"remp-up-{msg.wid}", daemon=True).start()
        threading.Thread(target=watch, name=f"remp-watch-{msg.wid}", daemon=True).start()

    def _stop_all(self, grace_s: float = 5.0) -> None:
        deadline = time.monotonic() + grace_s
        for wid, p in self.procs.items():
            if not self.exits[wid].wait(max(0.0, deadline - time.monotonic())):  # the head sent them Shutdown
                p.kill()
                self.exits[wid].wait(2.0)
        if self.segment is not None:
            self.segment.close(unlink=True)


def run_node(node_rank: int, master_addr: str, master_port: int, workers: int, connect_timeout_s: float = 300.0) -> int:
    return NodeAgent(node_rank, master_addr, master_port, workers, connect_timeout_s).run()
