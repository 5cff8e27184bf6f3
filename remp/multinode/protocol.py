"""Messages between the head node and the agent of each other node, through the head's TCP store (pickled).

Queues: `remp/register` (agents -> head, once each), `remp/agent/<node>` (head -> that node's agent) and
`remp/nodeup/<node>` (agent -> head: its workers' exits). A worker's own traffic uses the link queues of
link.py, keyed by its worker id (fixed for its life; its rank changes with the pool)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REGISTER = "remp/register"


def rank_claim(node: int) -> str:
    """Set once by the agent that takes this node rank (compare-and-set): a second one is refused."""
    return f"remp/rank/{node}"


class NodeUnreachable(RuntimeError):
    """A node did not join the head in time, or the head did not answer a node."""


def agent_queue(node: int) -> str:
    return f"remp/agent/{node}"


def node_up_queue(node: int) -> str:
    return f"remp/nodeup/{node}"


def link_queues(wid: int) -> tuple[str, str]:
    """(driver -> worker, worker -> driver) queues of a worker on another node."""
    return f"remp/down/{wid}", f"remp/up/{wid}"


@dataclass(frozen=True)
class NodeInfo:
    node_rank: int
    host: str
    cpus: int
    workers: int  # how many workers it runs at start
    address: str  # the address its workers reach the others from


@dataclass(frozen=True)
class SpawnWorker:
    wid: int
    rank: int
    cfg: Any  # worker.WorkerConfig (the agent sets its node-local parts: threads, shared memory)
    topology: Any  # topology.Topology | None


@dataclass(frozen=True)
class KillWorker:
    wid: int


@dataclass(frozen=True)
class PeerLost:
    """A worker was lost: survivors on this node waiting in a shared-memory all-reduce give up. Answered by
    PeerLostDone, before the head regroups the survivors."""

    seq: int


@dataclass(frozen=True)
class PeerLostDone:
    node: int
    seq: int


@dataclass(frozen=True)
class HeadAlive:
    """Every HEARTBEAT_S from the head to each agent: an agent that hears nothing for HEAD_LOST_S (a head
    gone without closing its connections: a partition, a power loss) stops its workers and exits."""


@dataclass(frozen=True)
class StopNode:
    """The head is shutting down: stop every worker and exit."""


@dataclass(frozen=True)
class NodeAlive:
    """Every HEARTBEAT_S from each agent: a node silent for NODE_LOST_S is lost with all its workers."""

    node: int


@dataclass(frozen=True)
class WorkerExited:
    wid: int
    exitcode: int
