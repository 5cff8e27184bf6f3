"""Data-parallel replicas (float64, tiny model): every DP x TP x PP shape of four workers gives the single worker's
tokens and logprobs; switches between DP and TP shapes with requests in flight change no token and move the
planner's minimum; a lost worker costs only its replica's KV; the planner routes each old replica's KV to the
new replicas that keep the most of it."""

import os
import signal

import pytest

from remp import LLMEngine, SamplingParams
from remp.model.families import config_from_hf
from remp.planner.plan import KVPiece, PieceSizer, best_placement, kv_routes, make_plan, worker_pieces
from remp.replicas import Replica, route
from remp.request import Request
from remp.scheduler import Scheduler
from remp.tools.random_model import tiny_config
from remp.topology import Topology
from tests.test_reconfigure import ENGINE, PROMPTS, assert_same, params

CFG = config_from_hf(tiny_config())  # 6 q heads, 2 KV heads, 4 layers


def run(path, dp, tp, pp, switches=None, mode="live", kill=None, **kw):
    """Serve PROMPTS on DP x TP x PP; switches: {step: (dp, tp, pp)}; kill: (step, rank) SIGKILLs that worker."""
    engine = LLMEngine(
        model=str(path), data_parallel_size=dp, tensor_parallel_size=tp, pipeline_parallel_size=pp,
        **{**ENGINE, **kw},
    )  # fmt: skip
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
    served = {r.request_id: r.replica for rep in engine.replicas for r in rep.scheduler.waiting}
    outs, reports, pending = {}, [], sorted(switches or {})
    try:
        while engine.has_unfinished_requests():
            if kill and engine.num_steps == kill[0]:
                os.kill(engine.executor.procs[kill[1]].pid, signal.SIGKILL)
                kill = None
            outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
            while pending and engine.num_steps >= pending[0]:
                to_dp, to_tp, to_pp = switches[pending.pop(0)]
                reports.append(engine.reconfigure(to_tp, to_pp, mode=mode, data_parallel_size=to_dp))
        assert not pending
        for rep in engine.replicas:
            assert rep.scheduler.pool.num_free == rep.scheduler.pool.num_blocks  # every block came back
        return outs, reports, engine, served
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return run(tiny_llama, 1, 1, 1)[0]


@pytest.mark.parametrize("shape", [(2, 2, 1), (2, 1, 2), (4, 1, 1)], ids=lambda s: "DP{}xTP{}xPP{}".format(*s))
def test_every_dp_shape_of_four_workers_equals_one_worker(tiny_llama, reference, shape):
    out, _, engine, served = run(tiny_llama, *shape)
    assert_same(reference, out)
    assert len(set(served.values())) == shape[0], "the router spreads requests over every replica"


def test_dp_and_tp_switches_with_requests_in_flight_change_no_token(tiny_llama, reference):
    shapes = {3: (2, 2, 1), 9: (4, 1, 1), 15: (1, 2, 2), 20: (1, 4, 1)}
    out, reports, _, _ = run(tiny_llama, 1, 4, 1, shapes)
    assert_same(reference, out)
    assert [r.new_topology for r in reports] == ["DP2xTP2xPP1", "DP4xTP1xPP1", "TP2xPP2", "TP4xPP1"]
    for r in reports:
        assert r.bytes_moved == r.min_bytes and not r.preempted
    assert reports[0].bytes_moved["kv"] == 0  # TP4 holds each KV head twice: both TP2 replicas keep theirs


def test_stop_mode_between_replicas_and_one_replica(tiny_llama, reference):
    out, reports, _, _ = run(tiny_llama, 2, 1, 1, {3: (1, 2, 1), 9: (2, 1, 1), 15: (1, 1, 2)}, mode="stop")
    assert_same(reference, out)
    assert all(r.mode == "stop" and r.bytes_moved["kv"] > 0 for r in reports)


def test_a_lost_worker_costs_only_its_replicas_kv(tiny_llama, reference):
    out, _, engine, served = run(tiny_llama, 2, 1, 1, kill=(4, 1))
    assert_same(reference, out)
    (recovery,) = [r for r in engine.stats.switches if r.cause == "worker_lost"]
    assert str(engine.topology) == "TP1xPP1"
    # the survivor's replica kept its KV; only the lost replica's running requests recomputed theirs
    assert recovery.preempted and all(served[rid] == 1 for rid in recovery.preempted)


# ---- pure: routes, plans, the router ------------------------------------------------------------------------
def test_routes_keep_kv_in_place_and_split_ties():
    assert kv_routes(CFG, Topology(2, 1), Topology(1, 1, (0, 1), dp=2)) == {0: [0, 1]}  # each keeps one head
    assert kv_routes(CFG, Topology(1, 1, (0, 1), dp=2), Topology(2, 1)) == {0: [0], 1: [0]}  # merged
    assert kv_routes(CFG, Topology(2, 1, (0, 1, 2, 3), dp=2), Topology(2, 1, (2, 3, 0, 1), dp=2)) == {
        0: [1],
        1: [0],
    }  # the replicas swapped workers: each one's KV follows its workers


@pytest.mark.parametrize(
    "old, new",
    [((1, 4, 1), (2, 2, 1)), ((2, 2, 1), (4, 1, 1)), ((4, 1, 1), (1, 2, 2)), ((2, 1, 2), (2, 2, 1))],
    ids=str,
)
def test_dp_plans_cover_every_piece_once_and_move_the_minimum(old, new):
    old_t = Topology(old[1], old[2], dp=old[0])
    sizer = PieceSizer(CFG, 8, 5, 8)
    placed = best_placement(CFG, old_t, new[1], new[2], sizer, dp=new[0])
    routes = kv_routes(CFG, old_t, placed)
    sizer = sizer.with_blocks({(s, d): 5 for s, ds in routes.items() for d in ds})
    plan = make_plan(CFG, old_t, placed, sizer)
    for w, needs in plan.needs.items():
        held = set(worker_pieces(CFG, old_t, w, True, routes))
        for p in needs:
            if isinstance(p, KVPiece):
                sources = (p in held) + sum(t.piece == p and t.dst == w for t in plan.transfers)
                assert sources == 1, (w, p)
    assert plan.moved.total == plan.minimum.total and not plan.from_checkpoint.total


def test_the_router_sends_work_to_the_least_loaded_replica():
    replicas = [Replica(Scheduler(16, 8, 8, 64)) for _ in range(2)]
    busy = Request("busy", None, list(range(40)), SamplingParams(max_tokens=30), max_tokens=30)
    replicas[0].scheduler.add(busy)
    new = Request("new", None, list(range(5)), SamplingParams(max_tokens=5), max_tokens=5)
    assert route(replicas, new) == 1
    replicas[1].scheduler.add(Request("big", None, list(range(100)), SamplingParams(max_tokens=50), max_tokens=50))
    assert route(replicas, new) == 0
