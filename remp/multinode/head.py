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
    SpawnWorker,
    StopNode,
    WorkerExited,
    agent_queue,
    node_up_queue,
)

logger = init_logger(__name__)


NODE_LOST_S = 4 * HEARTBEAT_S
HEAD_LOST_S = 20 * HEARTBEAT_S  # generous: the head's process also runs the engine


class ClusterHost:
    def __init__(self, nnodes: int, master_addr: str, master_port: int, local_workers: int, join_timeout_s: float):
        self.addr, self.port = master_addr, master_port
        try:
            self.store = dist.TCPStore(
                master_addr,
                master_port,
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=join_timeout_s),
            )
        except (dist.DistError, RuntimeError) as e:
            raise RuntimeError(f"cannot listen on {master_addr}:{master_port} for the other nodes: {e}") from None
        self.nodes: dict[int, NodeInfo] = {
            0: NodeInfo(0, socket.gethostname(), os.cpu_count() or 1, local_workers, master_addr)
        }
        self._procs: dict[int, RemoteProcess] = {}
        self._heard: dict[int, float] = {}  # node -> when its agent was last heard from
        self._threads: list[threading.Thread] = []
        try:
            self._await_nodes(nnodes, join_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self._stopping = threading.Event()
        self._threads.append(threading.Thread(target=self._beat, name="remp-head-alive", daemon=True))
        self._threads[-1].start()
        for node in self.remote_nodes:
            self._heard[node] = time.monotonic()
            self._threads.append(pump(blocking_client(self.store), node_up_queue(node), self._on_node_message, _noop))

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
            if info.node_rank in self.nodes or not 0 < info.node_rank < nnodes:
                logger.error("node rank %d (%s) refused: taken or outside 1..%d", info.node_rank, info.host, nnodes - 1)
                self._send(info.node_rank, StopNode())
                continue
            self.nodes[info.node_rank] = info
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
                except dist.DistError:
                    return

    @property
    def remote_nodes(self) -> list[int]:
        return sorted(n for n in self.nodes if n != 0)

    def rendezvous(self, generation: int) -> str:
        """Where a generation's torch.distributed world meets: this store, under its own prefix."""
        return f"store://{self.addr}:{self.port}/gen{generation}"

    def _send(self, node: int, msg: object) -> None:
        self.store.queue_push(agent_queue(node), pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def spawn(self, node: int, wid: int, rank: int, cfg, topology) -> tuple[StoreLink, RemoteProcess]:
        link = StoreLink(self.store, wid)
        proc = RemoteProcess(wid, node, lambda w: self._send(node, KillWorker(w)))
        self._procs[wid] = proc
        self._send(node, SpawnWorker(wid, rank, cfg, topology))
        return link, proc

    def _on_node_message(self, data: bytes) -> None:
        msg = pickle.loads(data)
        if isinstance(msg, NodeAlive):
            self._heard[msg.node] = time.monotonic()
        elif isinstance(msg, WorkerExited) and msg.wid in self._procs:
            self._procs.pop(msg.wid).exited(msg.exitcode)

    def mark_silent_nodes_lost(self) -> list[int]:
        """Nodes whose agent has been silent for NODE_LOST_S: every worker there counts as exited (a node that
        is gone takes its workers with it: they die with their agent). Returns those nodes."""
        now = time.monotonic()
        silent = [n for n, t in self._heard.items() if now - t > NODE_LOST_S]
        for wid, proc in list(self._procs.items()):
            if proc.node in silent:
                self._procs.pop(wid).exited(-9)
        return silent

    def peer_lost(self) -> None:
        for node in self.remote_nodes:
            self._send(node, PeerLost())

    def shutdown(self) -> None:
        """Stop the agents (they stop their workers); idempotent."""
        if hasattr(self, "_stopping"):
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
