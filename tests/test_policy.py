"""The topology policy on synthetic load sequences: it follows a load step toward throughput and back toward
latency, holds still under noise, and never switches when the switch costs more than it gains."""

import numpy as np
import pytest

from remp.policy.decide import PolicyConfig, SwitchCost, TopologyPolicy
from remp.policy.observe import LoadWindow
from remp.policy.predict import Limits, Load, Slo, predict
from remp.request import Request
from remp.sampling_params import SamplingParams
from remp.scheduler import Scheduler
from remp.topology import Shape, parse_shape, shape_name
from tests.policy_utils import ToyModel

CANDIDATES = [Shape(4, 1), Shape(2, 2), Shape(1, 4)]
TP4 = Shape(4, 1)
LIMITS = Limits(max_num_seqs=256, max_num_batched_tokens=8192)
SLO = Slo(ttft_s=2.0, tpot_s=0.15)
CHAT = dict(prompt_len=1000, output_len=200)
LONG = dict(prompt_len=4000, output_len=30)


def policy(pause_s=0.05, **kw):
    cfg = PolicyConfig(SLO, interval_s=5.0, min_dwell_s=30.0, horizon_s=120.0, **kw)
    return TopologyPolicy(ToyModel(), CANDIDATES, LIMITS, cfg, lambda a, b: SwitchCost(pause_s=pause_s))


def run(pol, loads, start=TP4):
    """Feed one load per interval; returns the topology after each decision."""
    current, seen = start, []
    for k, load in enumerate(loads):
        d = pol.decide(k * pol.config.interval_s, load, current)
        if d.action == "switch":
            current = parse_shape(d.target)
        seen.append(current)
    return seen


def test_the_toy_node_has_a_latency_and_a_throughput_topology():
    low = {c: predict(ToyModel(), c, Load(1.0, **CHAT), LIMITS, SLO) for c in CANDIDATES}
    assert min(low, key=lambda c: low[c].tpot_s) == TP4
    high = {c: predict(ToyModel(), c, Load(1.0, **LONG), LIMITS, SLO) for c in CANDIDATES}
    assert max(high, key=lambda c: high[c].capacity_req_s) != TP4


def test_load_step_up_then_down_switches_toward_throughput_then_latency():
    pol = policy()
    cap_tp4 = predict(ToyModel(), TP4, Load(1.0, **LONG), LIMITS, SLO).capacity_req_s
    loads = [Load(1.0, **CHAT, rate_stderr=0.1)] * 10
    loads += [Load(cap_tp4 * 1.3, **LONG, queue=40, rate_stderr=0.2)] * 20
    loads += [Load(1.0, **CHAT, rate_stderr=0.1)] * 20
    seen = run(pol, loads)
    assert seen[9] == TP4, "low load: the lowest-latency topology"
    assert seen[29] != TP4, "prefill-heavy overload: a pipeline for its capacity"
    assert seen[-1] == TP4, "back to low load: back to the lowest latency"
    assert pol.counts["switch"] == 2
    switch = next(d for d in pol.decisions if d.action == "switch")
    assert "goodput" in switch.reason and switch.predictions


def test_noise_around_one_load_never_switches():
    rng = np.random.default_rng(0)
    pol = policy()
    loads = [
        Load(float(rng.uniform(1.5, 2.5)), float(rng.uniform(900, 1100)), float(rng.uniform(180, 220)), rate_stderr=0.3)
        for _ in range(60)
    ]
    assert set(run(pol, loads)) == {TP4}
    assert pol.counts["switch"] == 0


def test_a_switch_that_costs_more_than_it_gains_is_not_made():
    pol = policy(pause_s=3600.0)
    cap_tp4 = predict(ToyModel(), TP4, Load(1.0, **LONG), LIMITS, SLO).capacity_req_s
    seen = run(pol, [Load(cap_tp4 * 1.3, **LONG, queue=40, running=100)] * 10)
    assert set(seen) == {TP4}
    assert any("does not clear the bar" in d.reason for d in pol.decisions)


def test_dwell_time_holds_a_new_topology():
    pol = policy()
    pol.switched(0.0)
    cap_tp4 = predict(ToyModel(), TP4, Load(1.0, **LONG), LIMITS, SLO).capacity_req_s
    d = pol.decide(10.0, Load(cap_tp4 * 1.3, **LONG, queue=40), TP4)
    assert d.action == "stay" and "dwell" in d.reason


def test_no_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one candidate"):
        TopologyPolicy(ToyModel(), [], LIMITS, PolicyConfig(SLO), lambda a, b: SwitchCost(0.0))


def test_load_window_rates_lengths_and_latencies():
    w = LoadWindow(window_s=10.0)
    assert w.snapshot(0.0) is None
    for k in range(40):  # 2 per second over 20 s
        w.arrival(k * 0.5, prompt_tokens=100 + k, max_tokens=50)
    w.finished(19.0, output_tokens=20, ttft_s=0.3, tpot_s=0.05)
    load = w.snapshot(20.0, queue=3, running=5)
    assert load.arrival_rate == pytest.approx(2.0, rel=0.1)
    assert load.prompt_len == pytest.approx(np.mean([100 + k for k in range(20, 40)]))
    assert load.output_len == 20  # what finished requests produced, not max_tokens
    assert (load.queue, load.running) == (3, 5)
    assert w.latency() == {"ttft_p50_s": 0.3, "tpot_p50_s": 0.05}


def test_pipeline_micro_batches_share_the_running_requests_and_the_budget():
    s = Scheduler(num_blocks=1000, block_size=16, max_num_seqs=64, max_num_batched_tokens=64)
    reqs = [Request(str(i), None, [1] * 8, SamplingParams(max_tokens=4), 4) for i in range(8)]
    for r in reqs:
        s.add(r)
    first = s.schedule(micro_batches=2)
    assert sum(n for _, n in first.scheduled) <= 32, "a micro-batch takes its share of the token budget"
    for r, n in first.scheduled:
        r.num_computed_tokens += n
    second = s.schedule(busy={r for r, _ in first.scheduled}, micro_batches=2)
    assert second.scheduled and not {r for r, _ in second.scheduled} & {r for r, _ in first.scheduled}


def test_shapes_carry_data_parallel_replicas():
    assert parse_shape("TP4xPP2") == Shape(4, 2) == (4, 2, 1) and shape_name(Shape(4, 2)) == "TP4xPP2"
    assert parse_shape("tp4") == Shape(4, 1) and parse_shape("DP2xTP2") == Shape(2, 1, 2)
    assert shape_name(parse_shape("DP2xTP4xPP1")) == "DP2xTP4xPP1" == str(Shape(4, 1, 2))
    assert Shape(2, 2, 2).size == 8 and Shape(2, 2, 2).replica == Shape(2, 2)
    for bad in ("eight", "TP0", "DP2", "DP2xPP2"):
        with pytest.raises(ValueError, match="TP<n>xPP<m> or DP<d>xTP<n>xPP<m>"):
            parse_shape(bad)


def test_data_parallel_replicas_share_the_load():
    """DP2 of a shape: twice the capacity; each replica sees half the arrivals, so latency as one at half the rate."""
    load = Load(6.0, **CHAT)
    one, two = (
        predict(ToyModel(), Shape(2, 1), load, LIMITS, SLO),
        predict(ToyModel(), Shape(2, 1, 2), load, LIMITS, SLO),
    )
    half = predict(ToyModel(), Shape(2, 1), Load(3.0, **CHAT), LIMITS, SLO)
    assert two.capacity_req_s == pytest.approx(2 * one.capacity_req_s)
    assert (two.tpot_s, two.ttft_s) == pytest.approx((half.tpot_s, half.ttft_s))
    assert two.topology == "DP2xTP2xPP1"
