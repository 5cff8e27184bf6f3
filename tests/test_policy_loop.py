"""The policy's closed loop and its guards: observations correct a wrong model, a regretted switch is undone once
and not repeated under the same load, and the oracle finds the best schedule in hindsight."""

import itertools

import numpy as np
import pytest

from remp.planner.mode import SwitchCost
from remp.policy.calibrate import Scaled
from remp.policy.decide import PolicyConfig, TopologyPolicy
from remp.policy.observe import LoadWindow, Observation
from remp.policy.predict import Limits, Load, Slo, predict
from remp.sim.oracle import best_schedule
from remp.topology import Shape, parse_shape
from tests.policy_utils import ToyModel

A, B = Shape(4, 1), Shape(1, 4)
LIMITS = Limits(max_num_seqs=256, max_num_batched_tokens=8192)
SLO = Slo(ttft_s=2.0, tpot_s=0.15)


def policy(model, candidates=(A, B)) -> TopologyPolicy:
    cfg = PolicyConfig(SLO, interval_s=5.0, min_dwell_s=30.0, horizon_s=120.0)
    return TopologyPolicy(model, list(candidates), LIMITS, cfg, lambda a, b: SwitchCost(pause_s=0.05))


def seen(tpot_s: float, good: float = 1.0, load: Load | None = None, since: float = 0.0) -> Observation:
    """50 requests finished at `tpot_s`, `good` of them within the SLOs; running as Little's law has it."""
    running = load.arrival_rate * tpot_s * (load.output_len + 1) if load else 0.0
    return Observation(since, 50, 0.2, tpot_s, good, 2.0, 0.0, running)


def test_the_closed_loop_corrects_a_model_twice_too_fast_within_six_decisions():
    truth = ToyModel()
    pol = policy(Scaled(truth, 0.5))  # the policy believes every step takes half as long as it does
    load = Load(2.0, 1000, 200, rate_stderr=0.1)
    observed_tpot = predict(truth, A, load, LIMITS, SLO).tpot_s
    log = []
    for k in range(60):
        d = pol.decide(5.0 * k, load, A, seen(observed_tpot, load=load))
        log.append(d.observed)
    # the load must have held for a window (30 s) before the first correction; six decisions on, it is right
    start = next(k for k, e in enumerate(log) if "factor" in e)
    right = [k for k, e in enumerate(log) if abs(e.get("tpot_predicted_s", 0) / observed_tpot - 1) < 0.05]
    assert start == 5 and right[0] <= start + 6 and right == list(range(right[0], 60))
    first = log[start]
    assert first["tpot_predicted_s"] == pytest.approx(observed_tpot / 2, rel=0.05) and first["model_error"] > 0.5
    assert pol.calibration.factor(A) == pytest.approx(2.0, rel=0.02)
    assert pol.calibration.factor(B) == pytest.approx(2.0, rel=0.02), "an unseen topology shares the model's bias"
    assert pol.calibration.error() < 0.05, "the margin shrinks once the model is right (six windows of misses)"
    assert pol.counts["switch"] == 0


def test_a_load_that_moves_does_not_calibrate():
    pol = policy(ToyModel())
    for k in range(10):
        load = Load(2.0 * 1.5**k, 1000, 200)
        d = pol.decide(5.0 * k, load, A, seen(10.0))  # a wild TPOT, but the load never holds still
        assert "factor" not in d.observed and not d.observed["steady"]
    assert pol.calibration.factor(A) == 1.0


class Rigged(ToyModel):
    """Believes B four times as fast as it is: its goodput predictions for B are wrong, its TPOTs consistent."""

    def stage_s(self, tp, pp, b):
        return super().stage_s(tp, pp, b) * (0.25 if (tp, pp) == (B.tp, B.pp) else 1.0)


def test_the_regret_guard_undoes_a_bad_switch_once_and_blocks_the_loop():
    model = Rigged()
    pol = policy(model)
    cap_a = predict(model, A, Load(1.0, 2000, 100), LIMITS, SLO).capacity_req_s
    load = Load(1.3 * cap_a, 2000, 100, rate_stderr=0.2)  # A falls behind (by the model); B looks to keep up
    current, switches = A, []
    for k in range(40):
        tpot = predict(model, current, load, LIMITS, SLO).tpot_s
        good = 0.6 if current == A else 0.3  # what the topologies really deliver: B worse than A
        d = pol.decide(5.0 * k, load, current, seen(tpot, good, load, pol.observe_from))
        if d.action == "switch":
            switches.append((d.current, d.target, d.kind))
            current = parse_shape(d.target)
            pol.switched(5.0 * k)
    assert switches == [(str(A), str(B), "gain"), (str(B), str(A), "revert")]
    assert "regret" in next(d.reason for d in pol.decisions if d.kind == "revert")
    assert "regretted under this load regime" in pol.decisions[-1].reason
    # another regime: the way is open again, but it must clear a higher bar
    d = pol.decide(500.0, Load(3 * cap_a, 2000, 100, rate_stderr=0.2), A, seen(0.05, 0.6))
    assert "regretted" not in d.reason


def test_the_oracle_is_exact_on_a_hand_checkable_case():
    values = {A: [5, 5, 0, 0], B: [0, 1, 5, 5]}
    assert best_schedule(values, lambda a, b, w: 1.0) == (19.0, [A, A, B, B])
    assert best_schedule(values, lambda a, b, w: 100.0) == (11.0, [B, B, B, B])
    # and it is the brute-force optimum over every schedule of random values and costs
    rng = np.random.default_rng(0)
    shapes = [A, B, Shape(2, 2)]
    for _ in range(20):
        vals = {c: rng.uniform(0, 10, 5).tolist() for c in shapes}
        cost = {(a, b): rng.uniform(0, 5) for a in shapes for b in shapes}

        def total(path, vals=vals, cost=cost):
            moves = sum(cost[a, b] for a, b in zip(path, path[1:]) if a != b)
            return sum(vals[c][w] for w, c in enumerate(path)) - moves

        best = max(total(p) for p in itertools.product(shapes, repeat=5))
        value, path = best_schedule(vals, lambda a, b, w, cost=cost: cost[a, b])
        assert value == pytest.approx(best) and total(path) == pytest.approx(best)


def test_observations_count_only_what_arrived_on_the_current_topology():
    w = LoadWindow(window_s=60.0)
    for k in range(20):
        w.arrival(float(k), 100, 10)
    w.finished(10.0, 10, ttft_s=5.0, tpot_s=0.1, arrived=4.0)  # arrived before the switch at 5 s: not counted
    for k in range(6, 12):
        w.finished(k + 2.0, 10, ttft_s=0.5, tpot_s=0.05 if k < 10 else 0.5, arrived=float(k))
    for t, q in ((6.0, 0), (9.0, 3), (12.0, 6)):
        w.snapshot(t, queue=q)
    o = w.observe(12.0, since=5.0, slo=Slo(1.0, 0.1))
    assert o.finished == 6 and o.good_fraction == pytest.approx(4 / 6)
    assert o.tpot_p50_s == 0.05 and o.queue_growth_req_s == pytest.approx(1.0)
