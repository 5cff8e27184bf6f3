"""The pieces of a multi-node pool that need no second machine: the store link (framing, order, end), the
head's wait for nodes and a node's wait for the head (clear errors by their deadlines), and the options."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import threading
import time

import pytest
import torch.distributed as dist

from remp.engine_args import EngineArgs
from remp.entrypoints.cli import main as cli
from remp.multinode.head import ClusterHost
from remp.multinode.link import CLOSE, FRAME, StoreLink, blocking_client, pump, send_framed
from remp.multinode.net import interface_toward
from remp.multinode.protocol import HeadAlive, NodeUnreachable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=10))  # fmt: skip
    yield s


def test_link_carries_large_and_small_messages_in_order_then_ends(store):
    link = StoreLink(store, wid=7)
    other_side = store.clone()
    big = os.urandom(2 * FRAME + 12345)  # three frames: over the store's 8 MiB payload cap in all
    for msg in (b"a", big, b"", b"z" * 10):
        send_framed(other_side, link.up, msg)
    got = [link.recv_bytes() for _ in range(4)]
    assert got == [b"a", big, b"", b"z" * 10]
    received: list[bytes] = []
    down = pump(blocking_client(store), link.down, received.append, lambda: received.append(b"<end>"))
    link.send_bytes(big)
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:  # pushes of two connections are not ordered
        time.sleep(0.01)
    other_side.queue_push(link.down, CLOSE)
    down.join(10)
    assert received == [big, b"<end>"]
    other_side.queue_push(link.up, CLOSE)  # the worker side went away: the driver reads EOF
    with pytest.raises(EOFError):
        link.recv_bytes()
    link.close()


def test_head_names_the_nodes_that_did_not_join():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(NodeUnreachable, match=r"nodes \[1, 2\] of 3 did not join .* within 1 s.*--node-rank K"):
        ClusterHost(3, "127.0.0.1", port, 1, join_timeout_s=1.0)
    assert time.monotonic() - t0 < 10


def test_headless_node_without_a_head_says_so(capsys):
    port = free_port()
    args = ["serve", "--headless", "--nnodes", "2", "--node-rank", "1", "--master-port", str(port)]
    assert cli([*args, "--node-join-timeout-s", "1", "--workers-per-node", "1"]) == 2
    assert f"node 1: no head node answered at 127.0.0.1:{port} within 1 s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--node-rank", "1", "--nnodes", "2"], "add --headless"),
        (["serve", "--headless"], "--nnodes 2 or more"),
        (["serve", "--headless", "--nnodes", "2", "--node-rank", "2"], "node-rank 1..nnodes-1"),
    ],
)
def test_node_options_refused_with_the_reason(argv, message, capsys):
    assert cli(argv) == 2
    assert message in capsys.readouterr().err


def test_engine_options_for_several_nodes():
    with pytest.raises(ValueError, match="do not divide over 2 nodes"):
        EngineArgs(tensor_parallel_size=3, nnodes=2)
    with pytest.raises(ValueError, match="the engine runs on node 0"):
        EngineArgs(nnodes=2, node_rank=1)
    assert EngineArgs(tensor_parallel_size=3, nnodes=2, workers_per_node=2).local_workers == 2
    assert EngineArgs(tensor_parallel_size=2, pipeline_parallel_size=2, nnodes=2).local_workers == 2


def test_interface_toward_loopback():
    assert interface_toward("127.0.0.1") == ("lo", "127.0.0.1")


@pytest.fixture
def node_env(monkeypatch):
    """A NodeAgent binds gloo/NCCL through the environment: keep that inside the test."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    return monkeypatch


def test_node_stops_when_the_head_falls_silent(store, node_env, caplog):
    """A head gone without closing its connections (a partition): no heartbeat, the node stops."""
    from remp.multinode import agent as agent_module

    node_env.setattr(agent_module, "HEAD_LOST_S", 1.0)
    node = agent_module.NodeAgent(1, "127.0.0.1", store.port, 1, connect_timeout_s=5)
    store.queue_push("remp/agent/1", pickle.dumps(HeadAlive()))  # it was heard once
    t0 = time.monotonic()
    with caplog.at_level("ERROR", logger="remp"):
        assert node.run() == 1
    assert time.monotonic() - t0 < 10
    assert "the head node has been silent for 1 s" in caplog.text


def test_a_node_rank_is_taken_once(store, node_env):
    from remp.multinode.agent import NodeAgent

    first = NodeAgent(1, "127.0.0.1", store.port, 1, connect_timeout_s=5)
    try:
        with pytest.raises(NodeUnreachable, match="node rank 1 is taken"):
            NodeAgent(1, "127.0.0.1", store.port, 1, connect_timeout_s=5)
    finally:
        first.close()


def test_nodes_joining_far_apart_all_stay(node_env):
    """Three nodes, the last joining well after the first would have given up on a silent head: the head
    beats from the start, so both agents serve until it stops them."""
    from remp.multinode import agent as agent_module

    node_env.setattr(agent_module, "HEAD_LOST_S", 1.0)
    port, hosts, codes = free_port(), [], {}
    head = threading.Thread(target=lambda: hosts.append(ClusterHost(3, "127.0.0.1", port, 1, join_timeout_s=20)))
    head.start()

    def node(rank: int) -> None:
        codes[rank] = agent_module.NodeAgent(rank, "127.0.0.1", port, 1, connect_timeout_s=20).run()

    first = threading.Thread(target=node, args=(1,))
    first.start()
    time.sleep(2.5)  # 2.5x the (shortened) time an agent waits for a silent head
    second = threading.Thread(target=node, args=(2,))
    second.start()
    head.join(30)
    assert hosts and sorted(hosts[0].nodes) == [0, 1, 2]
    assert first.is_alive() and second.is_alive()
    hosts[0].shutdown()
    first.join(20)
    second.join(20)
    assert codes == {1: 0, 2: 0}


def test_old_generations_rendezvous_keys_are_deleted(node_env):
    host = ClusterHost(1, "127.0.0.1", free_port(), 1, join_timeout_s=5)
    try:
        for g in (0, 1, 2):
            dist.PrefixStore(f"gen{g}", host.store).set("rank0", "x")
        host.store.set("generation_unrelated", "y")
        host.rendezvous.forget_generations_before(2)
        assert sorted(host.store.list_keys()) == ["gen2/rank0", "generation_unrelated"]
    finally:
        host.shutdown()
