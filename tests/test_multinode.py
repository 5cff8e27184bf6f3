"""A pool on two machines, for real: a head node and a worker node in two network namespaces joined by a veth
pair, talking over that link only (the head's TCP store, gloo bound to the veth). float64 tiny model: tokens
and logprobs equal a single worker's, across a TP group split over the nodes, a live switch with requests in
flight, and a worker killed on the other node (in make test-all also: a whole node lost, the pool growing over
both nodes). Skips where namespaces or veth pairs cannot be made (not root, no iproute2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from remp.tools import netns
from tests.test_reconfigure import assert_same
from tests.test_recovery import run
from tests.test_worker_failures import wait_dead

WHY_NOT = netns.reason_unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

PORT = 29611
DRIVER = Path(__file__).with_name("multinode_driver.py")


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return run(tiny_llama, 1, 1)[0]


@pytest.fixture
def nodes():
    n = netns.two_nodes()
    yield n
    n.close()


def run_two_nodes(nodes, model, tp, pp, workers_per_node, timeout_s=150, **spec) -> tuple[dict, subprocess.Popen]:
    """The head's driver in namespace 0, `remp serve --headless` in namespace 1; the driver's JSON result."""
    agent = nodes.start_worker_node(PORT, workers_per_node, "--node-join-timeout-s", "60")
    spec = dict(model=str(model), tp=tp, pp=pp, addr=nodes.addrs[0], port=PORT, workers_per_node=workers_per_node,
                **spec)  # fmt: skip
    spec["kill_pids"] = [[step, agent.pid] for step in spec.pop("kill_agent_at", [])]
    head = nodes.popen(0, [str(DRIVER), json.dumps(spec)], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = head.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        head.kill()
        raise
    assert head.returncode == 0, f"the head's driver failed ({head.returncode})"
    return json.loads(out.strip().splitlines()[-1]), agent


def outputs(result: dict) -> dict:
    return {
        k: SimpleNamespace(
            token_ids=v["token_ids"],
            logprobs=[{int(t): SimpleNamespace(logprob=lp) for t, lp in d.items()} for d in v["logprobs"]],
        )
        for k, v in result["outs"].items()
    }


def finished_cleanly(result: dict, agent: subprocess.Popen, expect_agent_rc: int | None = 0) -> None:
    rc = agent.wait(30)
    if expect_agent_rc is not None:
        assert rc == expect_agent_rc, "the worker node's agent did not stop when the head did"
    assert not wait_dead(result["pids"]), "a worker process (on either node) outlived the engine"


def test_tp2_split_over_two_nodes_then_the_remote_worker_killed(tiny_llama, reference, nodes):
    """TP2 with one rank on each machine (every all-reduce crosses the link), then the worker on the other
    node SIGKILLed: recovered onto the head's worker alone, as locally. Tokens and logprobs equal one
    worker's throughout (both phases in one run, to keep the suite short)."""
    result, agent = run_two_nodes(nodes, tiny_llama, 2, 1, workers_per_node=1, try_restart=True, kills=[[8, [1]]])
    assert "not offered on several nodes" in result["restart_refused"]
    assert [r["lost"] for r in result["recoveries"]] == [[1]]
    assert result["nodes"] == [0] and result["topology"] == "TP1xPP1"
    assert_same(reference, outputs(result))
    finished_cleanly(result, agent)


# make test keeps the cross-node kill test; this one is in make test-all
@pytest.mark.slow
def test_live_switch_across_nodes_with_requests_in_flight(tiny_llama, reference, nodes):
    result, agent = run_two_nodes(nodes, tiny_llama, 2, 2, workers_per_node=2, switch=[3, 1, 4])
    assert [s.get("new") for s in result["switch"]] == ["TP1xPP4"], result["switch"]
    assert result["nodes"] == [0, 0, 1, 1]
    assert result["switch"][0]["stage_nodes"] == [0, 0, 1, 1]  # the pipeline crosses the link once
    assert_same(reference, outputs(result))
    finished_cleanly(result, agent)


@pytest.mark.slow  # make test-all; make test kills the remote worker of a TP2 split instead
def test_worker_killed_on_the_other_node_is_recovered(tiny_llama, reference, nodes):
    result, agent = run_two_nodes(nodes, tiny_llama, 2, 2, workers_per_node=2, kills=[[3, [3]]])
    assert [r["lost"] for r in result["recoveries"]] == [[3]]
    assert len(result["placement"]) == 3 and result["nodes"] == [0, 0, 1]  # the three survivors serve on
    assert_same(reference, outputs(result))
    finished_cleanly(result, agent)


@pytest.mark.slow  # make test-all: growth across nodes beyond what the tests ask
def test_pool_grows_over_both_nodes_in_a_live_switch(tiny_llama, reference, nodes):
    """One worker on each node, then TP2xPP2: the two new workers start one on each node (each node back to
    its share), the switch runs live with requests in flight."""
    result, agent = run_two_nodes(nodes, tiny_llama, 1, 2, workers_per_node=1, switch=[3, 2, 2], max_workers=4)
    assert [s["new"] for s in result["switch"]] == ["TP2xPP2"], result["switch"]
    assert sorted(result["nodes"]) == [0, 0, 1, 1]
    assert_same(reference, outputs(result))
    finished_cleanly(result, agent)


@pytest.mark.slow  # make test-all (keeps make test within its time): a whole node lost
def test_whole_node_lost_is_one_recovery_onto_the_head(tiny_llama, reference, nodes):
    result, agent = run_two_nodes(nodes, tiny_llama, 2, 2, workers_per_node=2, kill_agent_at=[3])
    assert len(result["recoveries"]) == 1 and sorted(result["recoveries"][0]["lost"]) == [2, 3], result
    assert result["nodes"] == [0, 0] and len(result["placement"]) == 2
    assert_same(reference, outputs(result))
    finished_cleanly(result, agent, expect_agent_rc=None)  # SIGKILLed; its workers must still be gone
