"""The pieces of a multi-node pool that need no second machine: the store link (framing, order, end), the
head's wait for nodes and a node's wait for the head (clear errors by their deadlines), and the options."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch.distributed as dist

from remp.engine_args import EngineArgs
from remp.entrypoints.cli import main as cli
from remp.multinode.head import ClusterHost
from remp.multinode.link import CLOSE, FRAME, StoreLink, blocking_client, pump, send_framed
from remp.multinode.net import interface_toward
from remp.multinode.protocol import NodeUnreachable


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


def test_node_stops_when_the_head_falls_silent(store, monkeypatch, caplog):
    """A head gone without closing its connections (a partition): its heartbeat stops, the node stops."""
    from remp.multinode import agent as agent_module

    monkeypatch.setattr(agent_module, "HEAD_LOST_S", 1.0)
    node = agent_module.NodeAgent(1, "127.0.0.1", store.port, 1, connect_timeout_s=5)
    t0 = time.monotonic()
    assert node.run() == 1
    assert time.monotonic() - t0 < 10
