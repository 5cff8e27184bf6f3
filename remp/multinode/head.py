"""The head node's side of a pool spread over several machines: the TCP store every node connects to, the
nodes' registration, and starting, killing and hearing about workers on the other nodes (through their agents).
Every wait has a deadline, and its error names the nodes it waited for."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import threading
import time

import torch.distributed as dist

from remp.logger import init_logger
from remp.messages import HEARTBEAT_S
from remp.multinode.link import CLOSE, RemoteProcess, StoreLink, blocking_client, pump
from remp.multinode.protocol import (
    REGISTER,
    HeadAlive,
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
    node_up_queue,
)
from remp.rendezvous import Rendezvous

logger = init_logger(__name__)


NODE_LOST_S = 4 * HEARTBEAT_S
HEAD_LOST_S = 20 * HEARTBEAT_S  # generous: the head's process also runs the engine


class ClusterHost:
    def __init__(self, nnodes: int, master_addr: str, master_port: int, local_workers: int, join_timeout_s: float):
        try:
            self.rendezvous = Rendezvous(master_addr, master_port, join_timeout_s)
        except (dist.DistError, RuntimeError, OSError) as e:
            raise RuntimeError(f"cannot listen on {master_addr}:{master_port} for the other nodes: {e}") from None
        self.addr, self.port, self.store = master_addr, self.rendezvous.port, self.rendezvous.store
        self.nodes: dict[int, NodeInfo] = {
            0: NodeInfo(0, socket.gethostname(), os.cpu_count() or 1, local_workers, master_addr)
        }
        self._lock = threading.Condition()  # guards _procs, _heard, _acks: the node-up threads write them
        self._procs: dict[int, RemoteProcess] = {}
        self._heard: dict[int, float] = {}  # node -> when its agent was last heard from
        self._acks: set[tuple[int, int]] = set()  # (node, seq) of PeerLost handled
        self._peer_lost_seq = 0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        # beats from the start: an agent that joined first must not give up on us while the others join
        self._threads.append(threading.Thread(target=self._beat, name="remp-head-alive", daemon=True))
        self._threads[-1].start()
        try:
            self._await_nodes(nnodes, join_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _await_nodes(self, nnodes: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = self.store.clone()
        while len(self.nodes) < nnodes:
            left = deadline - time.monotonic()
            missing = sorted(set(range(nnodes)) - set(self.nodes))
            try:
                if left <= 0:
                    raise dist.DistStoreError("deadline")
                client.set_timeout(datetime.timedelta(seconds=left))
                info: NodeInfo = pickle.loads(client.queue_pop(REGISTER))
            except dist.DistStoreError:
                raise NodeUnreachable(
                    f"nodes {missing} of {nnodes} did not join {self.addr}:{self.port} within {timeout_s:.0f} s: "
                    f"start `remp serve --headless --nnodes {nnodes} --node-rank K --master-addr {self.addr} "
                    f"--master-port {self.port}` on each"
                ) from None
            if not 0 < info.node_rank < nnodes:  # agents claim their rank in the store: no duplicates get here
                logger.error("node rank %d (%s) ignored: outside 1..%d", info.node_rank, info.host, nnodes - 1)
                continue
            with self._lock:
                self.nodes[info.node_rank] = info
                self._heard[info.node_rank] = time.monotonic()
            up = pump(blocking_client(self.store), node_up_queue(info.node_rank), self._on_node_message, _noop)
            self._threads.append(up)
            logger.info(
                "node %d joined: %s (%s), %d workers, %d cpus",
                info.node_rank,
                info.host,
                info.address,
                info.workers,
                info.cpus,
            )

    def _beat(self) -> None:
        beat, data = self.store.clone(), pickle.dumps(HeadAlive())
        while not self._stopping.wait(HEARTBEAT_S):
            for node in self.remote_nodes:
                try:
                    beat.queue_push(agent_queue(node), data)
                except dist.DistError as e:
                    logger.warning("the head's heartbeat to the nodes stopped: %s", e)
                    return

    @property
    def remote_nodes(self) -> list[int]:
        return sorted(n for n in list(self.nodes) if n != 0)

    def _send(self, node: int, msg: object) -> None:
        self.store.queue_push(agent_queue(node), pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def spawn(self, node: int, wid: int, rank: int, cfg, topology) -> tuple[StoreLink, RemoteProcess]:
        link = StoreLink(self.store, wid)
        proc = RemoteProcess(wid, node, lambda w: self._send(node, KillWorker(w)))
        with self._lock:
            self._procs[wid] = proc
        self._send(node, SpawnWorker(wid, rank, cfg, topology))
        return link, proc

    def _on_node_message(self, data: bytes) -> None:
        msg = pickle.loads(data)
        with self._lock:
            if isinstance(msg, NodeAlive):
                if msg.node in self._heard:  # not a node already declared lost
                    self._heard[msg.node] = time.monotonic()
            elif isinstance(msg, WorkerExited):
                proc = self._procs.pop(msg.wid, None)
                if proc is not None:
                    proc.exited(msg.exitcode)
            elif isinstance(msg, PeerLostDone):
                self._acks.add((msg.node, msg.seq))
                self._lock.notify_all()

    def mark_silent_nodes_lost(self) -> list[int]:
        """Nodes whose agent has been silent for NODE_LOST_S are lost: every worker there counts as exited (a
        node that is gone takes its workers with it: they die with their agent), and one that was only slow is
        told to stop, so that nothing of it runs on. Returns those nodes."""
        now = time.monotonic()
        with self._lock:
            silent = [n for n, t in self._heard.items() if now - t > NODE_LOST_S]
            for node in silent:
                quiet = now - self._heard.pop(node)
                info = self.nodes.pop(node)
                logger.warning("node %d (%s, %s) silent for %.1f s: lost", node, info.host, info.address, quiet)
            lost = [wid for wid, proc in self._procs.items() if proc.node in silent]
            procs = [self._procs.pop(wid) for wid in lost]
        for node in silent:
            try:
                self._send(node, StopNode())
            except dist.DistError:
                pass
        for proc in procs:
            proc.exited(-9)
        return silent

    def peer_lost(self, timeout_s: float = NODE_LOST_S) -> None:
        """Survivors on other nodes spinning in a shared-memory all-reduce give up; returns once every node has
        done so (so that the Regroup that follows finds the loss counted), or after timeout_s."""
        self._peer_lost_seq += 1
        seq, nodes = self._peer_lost_seq, self.remote_nodes
        for node in nodes:
            self._send(node, PeerLost(seq))
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not all((n, seq) in self._acks for n in nodes) and time.monotonic() < deadline:
                self._lock.wait(max(0.0, deadline - time.monotonic()))
            late = [n for n in nodes if (n, seq) not in self._acks]
        if late:
            logger.warning("nodes %s did not confirm the loss within %.1f s", late, timeout_s)

    def shutdown(self) -> None:
        """Stop the agents (they stop their workers); idempotent."""
        self._stopping.set()
        for node in self.remote_nodes:
            try:
                self._send(node, StopNode())
                self.store.queue_push(node_up_queue(node), CLOSE)
            except dist.DistError:
                pass
        for t in self._threads:
            t.join(2.0)
        self._threads.clear()
        self.nodes = {0: self.nodes[0]}


def _noop() -> None:
    pass
