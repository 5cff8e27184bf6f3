"""The simulator: it drives remp's own Scheduler, agrees with the performance model's predictions in steady
state, is deterministic, follows a phased load with the policy, and refuses bad input clearly."""

import json
from pathlib import Path

import pytest

import remp.scheduler
from remp.bench.datasets import SampleRequest, trace_requests
from remp.entrypoints.cli import main
from remp.planner.mode import LIVE, RESTART
from remp.policy.decide import PolicyConfig, TopologyPolicy
from remp.policy.h100 import DATA_DIR
from remp.policy.measured import MeasuredModel, Profile
from remp.policy.perf_model import Batch
from remp.policy.predict import Limits, Load, Slo, predict
from remp.policy.switch_cost import SwitchCostModel
from remp.sim.models import model_config
from remp.sim.pipeline import Pipeline
from remp.sim.simulator import SimOptions, Simulator
from remp.sim.workload import phased_requests
from remp.topology import Shape
from tests.policy_utils import ToyModel

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_conv_2023.csv"
H100_DATA = DATA_DIR
CONFIG = model_config("llama-2-7b")
PHASES = [
    {"name": "chat", "request_rate": 2, "duration_s": 120, "input_len": 1000, "output_len": 200, "range_ratio": 0.5},
    {"name": "long prompts", "request_rate": 7, "duration_s": 120, "input_len": 4000, "output_len": 30},
    {"name": "chat", "request_rate": 2, "duration_s": 120, "input_len": 1000, "output_len": 200, "range_ratio": 0.5},
]


def toy_costs():
    return SwitchCostModel(CONFIG, bandwidth_Bps=100e9, block_size=16)


def toy_policy():
    """The policy over the toy node's three shapes, switching live."""
    costs = toy_costs()
    return TopologyPolicy(
        ToyModel(),
        [(4, 1), (2, 2), (1, 4)],
        Limits(256, 8192),
        PolicyConfig(Slo(2.0, 0.3), min_dwell_s=30.0),
        lambda a, b: costs.cost(a, b, LIVE, 0),
    )


def simulate(requests, topology, policy=None, mode=LIVE):
    return Simulator(ToyModel(), requests, topology, SimOptions(switch_mode=mode), toy_costs(), policy).run()


def poisson(rate, n, prompt, output, seed=0):
    import numpy as np

    t = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
    return [SampleRequest([], prompt, output, float(x)) for x in t]


def test_it_schedules_with_the_engines_scheduler(monkeypatch):
    calls = []
    real = remp.scheduler.Scheduler.schedule
    monkeypatch.setattr(remp.scheduler.Scheduler, "schedule", lambda self, *a: calls.append(a) or real(self, *a))
    run = simulate(poisson(2.0, 40, 500, 50), (2, 2))
    assert calls and all(mb == 2 for _, mb in calls)  # pp micro-batches, as the engine asks
    assert all(r.success and r.output_tokens == 50 for r in run.results)


@pytest.mark.parametrize("topology", [(4, 1), (2, 2)])
def test_steady_state_matches_the_prediction(topology):
    rate, p, o = 3.0, 800, 100
    run = simulate(poisson(rate, 600, p, o), topology)
    steady = [r for r in run.results if 40 < r.send_time < 160]
    sim_tpot = sorted((r.latency - r.ttft) / (r.output_tokens - 1) for r in steady)[len(steady) // 2]
    pred = predict(ToyModel(), topology, Load(rate, p, o), Limits(256, 8192), Slo(2.0, 0.15))
    assert sim_tpot == pytest.approx(pred.tpot_s, rel=0.25)


def test_seeded_simulation_is_deterministic():
    requests, _ = phased_requests([p | {"duration_s": 40} for p in PHASES], seed=3)

    def once():
        return simulate([SampleRequest(**r.__dict__) for r in requests], (4, 1), toy_policy())

    a, b = once(), once()
    assert [(r.ttft, r.latency) for r in a.results] == [(r.ttft, r.latency) for r in b.results]
    assert a.switches == b.switches


def test_policy_follows_the_phases_and_loses_nothing():
    requests, _ = phased_requests(PHASES, seed=1)
    run = simulate(requests, (4, 1), toy_policy())
    assert all(r.success for r in run.results)
    assert 1 <= len(run.switches) <= 3, run.switches  # at most one per phase
    first = run.switches[0]
    assert first["from"] == "TP4xPP1" and 120 <= first["time"] <= 240
    assert run.topology_timeline[-1][1] == "TP4xPP1"  # back to latency once the long prompts are gone


def test_restart_switches_recompute_every_running_request():
    requests = poisson(4.0, 200, 600, 200)
    costs = toy_costs()
    sim = Simulator(ToyModel(), requests, (4, 1), SimOptions(switch_mode=RESTART), costs)
    sim.t = 0.0
    orig = sim._submit
    done = []

    def submit():
        if sim.t > 20 and not done:
            done.append(len(sim.replicas[0].scheduler.running))
            sim.start_switch((2, 2), "test")
        orig()

    sim._submit = submit
    run = sim.run()
    assert run.switches[0]["pause_s"] == pytest.approx(costs.overheads.restart_s, abs=1e-3)
    assert run.switches[0]["preempted"] == done[0] > 0
    assert all(r.success for r in run.results)


def test_trace_reader_scales_cuts_and_fits_the_context(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,10\n2,5000,100\n10,20,5\n")
    reqs = trace_requests(f, time_scale=0.5, duration_s=4.0, max_model_len=4096)
    assert [r.arrival_s for r in reqs] == [0.0, 1.0]
    assert (reqs[1].prompt_len, reqs[1].output_len) == (4095, 1)


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt\n0,1\n")
    with pytest.raises(ValueError, match="lacks the column"):
        trace_requests(bad)
    assert main(["simulate", "--trace", str(bad)]) == 2
    assert "lacks the column(s) arrived_at" in capsys.readouterr().err
    ok = tmp_path / "ok.csv"
    ok.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,10\n")
    assert main(["simulate", "--trace", str(ok), "--h100-data", str(tmp_path / "nowhere")]) == 2
    assert "the H100 figures are not at" in capsys.readouterr().err


@pytest.mark.skipif(not H100_DATA.exists(), reason=f"the H100 figures are not at {H100_DATA}")
def test_bad_candidates_are_clear_errors(tmp_path, capsys):
    ok = tmp_path / "ok.csv"
    ok.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,100,10\n")
    args = ["simulate", "--trace", str(ok), "--topology-policy", "auto", "--candidates", "TP8xPP1,TP3xPP1"]
    assert main(args) == 2
    assert "unknown candidate(s) TP3xPP1" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(ok), "--candidates", "eight"]) == 2
    assert "TP<n>xPP<m>" in capsys.readouterr().err


@pytest.mark.skipif(not (TRACE.exists() and H100_DATA.exists()), reason=f"no Azure trace at {TRACE} or H100 data")
def test_cli_on_the_azure_trace_with_h100_figures(tmp_path):
    out = tmp_path / "r.json"
    args = ["simulate", "--model", "llama-2-7b", "--trace", str(TRACE), "--duration-s", "60", "-tp", "2", "-pp", "4"]
    assert main([*args, "--save-result", str(out), "--timeline", str(tmp_path / "t.png")]) == 0
    r = json.loads(out.read_text())
    assert r["completed"] == r["requests"] > 100 and r["failed"] == 0
    for key in ("throughput_tok_s", "goodput_req_s"):
        assert r[key] > 0
    assert set(r["ttft_ms"]) == set(r["tpot_ms"]) == {"p50", "p99"}
    assert r["switches"] == [] and (tmp_path / "t.png").stat().st_size > 10_000


def test_a_pipeline_stage_works_on_one_micro_batch_at_a_time():
    """Four whole prompts arriving together enter PP4 one stage time apart, as in the engine."""
    budget = 8192 // 4  # each micro-batch's share of the token budget: one prompt each
    run = simulate([SampleRequest([], budget, 2, 0.0) for _ in range(4)], (1, 4))
    stage = ToyModel().stage_s(1, 4, Batch.of([(0, budget, True)]))
    first = sorted(r.ttft for r in run.results)
    assert [b - a for a, b in zip(first, first[1:])] == pytest.approx([stage] * 3, rel=1e-9)


def test_stages_sharing_cores_slow_each_other_while_both_work():
    """Two micro-batches through PP2 where a stage takes twice as long while the other works too: A runs stage 0
    alone (0-1), then A on stage 1 and B on stage 0 share (1-3), then B runs stage 1 alone (3-4). The same
    whether the clock jumps from event to event or ticks in between (work done at the shared rate)."""
    for tick in (None, 0.25):
        done = {}
        for name, factor in (("shared", lambda active: 2.0 if active == 2 else 1.0), ("dedicated", lambda a: 1.0)):
            p = Pipeline(2, factor)
            p.submit("A", 1.0, 0.0, 0.0)
            p.submit("B", 1.0, 0.0, 0.0)
            while len(p):
                t = p.next_event() if tick is None else min(p.next_event(), p.now + tick)
                done |= {(name, x): t for x in p.advance(t)}
        assert done == pytest.approx(
            {("shared", "A"): 3.0, ("shared", "B"): 4.0, ("dedicated", "A"): 2.0, ("dedicated", "B"): 3.0}
        ), f"tick {tick}"


def test_measured_stages_share_the_profiled_cores():
    """TP1xPP4 on 2 cores: one or two busy stages run at full speed, four at half (stage_s is the latter)."""
    model = MeasuredModel(Profile("m", "float32", "cpu", 4, 16, fits={"TP1xPP4": [0.01, 0.0, 0.0]}, cores=2))
    assert [model.busy_factor(1, 4, k) for k in (1, 2, 3, 4)] == pytest.approx([0.5, 0.5, 0.75, 1.0])
    assert model.busy_factor(4, 1, 1) == 1.0


def test_data_parallel_replicas_are_routed_and_a_dp_switch_moves_the_running_requests():
    """TP4 -> DP2xTP2 mid-run: the running requests move with their KV (none recomputed) and split between the
    two replicas, later arrivals go to both, and everything finishes."""
    requests = poisson(6.0, 300, 600, 100)
    sim = Simulator(ToyModel(), requests, (4, 1), SimOptions(), toy_costs())
    submit, regroup, seen = sim._submit, sim._regroup, {}

    def switch_then_submit():
        if sim.t > 15 and not seen:
            sim.start_switch(Shape(2, 1, 2), "test")
            seen["asked"] = True
        submit()

    def watch(target, mode):
        before = {r.request_id for r in sim._running()}
        moved = regroup(target, mode)
        seen["split"] = [{r.request_id for r in rep.scheduler.running} for rep in sim.replicas]
        seen["before"] = before
        return moved

    sim._submit, sim._regroup = switch_then_submit, watch
    run = sim.run()
    assert [(s["from"], s["to"], s["preempted"]) for s in run.switches] == [("TP4xPP1", "DP2xTP2xPP1", 0)]
    a, b = seen["split"]
    assert a and b and not a & b and a | b == seen["before"]
    assert all(r.success and r.output_tokens == 100 for r in run.results)
    assert all(len(rep.scheduler.running) == 0 for rep in sim.replicas)


def test_a_data_parallel_switch_makes_every_replica_whole():
    costs = toy_costs()
    quarter = costs.model_bytes(2) / 4
    # two copies from one: one copy moves. The replicas interleave over the TP4 ranks (0 and 2, 1 and 3), so
    # each TP2 rank keeps the quarter it held and receives one quarter (contiguous, one would receive a half)
    to_dp = costs.moves(Shape(4, 1), Shape(2, 1, 2))
    assert to_dp.weight_bytes == pytest.approx(4 * quarter, rel=0.03)
    assert to_dp.weights_s == pytest.approx(quarter / 100e9, rel=0.03)
    back = costs.moves(Shape(2, 1, 2), Shape(4, 1))  # each keeps a half of what it holds: nothing moves
    assert back.weight_bytes == 0 and back.weights_s == 0


def test_gpu_fabrics_price_what_crosses_nodes_and_pcie():
    """Two H100 nodes: TP16's all-reduces and a pipeline's hand-off across the nodes go over InfiniBand rails; on
    PCIe, TP's all-reduces cost more than on NVLink."""
    from remp.policy.gpu import rtx5090_model
    from remp.policy.h100 import H100Model

    config = model_config("llama-2-7b")
    two = H100Model(config, "llama-2-7b", nodes=2)
    mb = 8 * 2**20
    assert two.fabric.all_reduce_s(16, mb) > two.fabric.all_reduce_s(8, mb) > two.fabric.all_reduce_s(4, mb)
    rail, nvlink = two.fabric.rail, two.fabric.send
    assert two.fabric.hop_s(8, 2, mb) == pytest.approx(rail[0] + rail[1] * mb)  # one stage per node
    assert two.fabric.hop_s(4, 2, mb) == pytest.approx(nvlink[0] + nvlink[1] * mb)  # both stages in node 0
    assert two.fabric.hop_s(4, 4, mb) == pytest.approx(  # stages 0, 1 | 2, 3
        (2 * (nvlink[0] + nvlink[1] * mb) + rail[0] + rail[1] * mb) / 3
    )
    assert two.supports_tp(16) and not H100Model(config, "llama-2-7b").supports_tp(16)
    pcie = rtx5090_model(config, "llama-2-7b")
    assert pcie.fabric.all_reduce_s(8, mb) > 3 * two.fabric.all_reduce_s(8, mb)
    assert pcie.kv_capacity_tokens(1, 1) > 0 and pcie.kv_capacity_tokens(8, 1) > 8 * pcie.kv_capacity_tokens(1, 1)


# the oracle's exactness stays in make test (test_policy_loop.py); the CLI run is in make test-all
@pytest.mark.slow
def test_cli_oracle_dp_candidates_and_the_pcie_device(tmp_path):
    """`remp simulate --oracle` on a small shifting workload of the PCIe device with data-parallel candidates:
    every candidate fixed, the best schedule in hindsight, and the policy's share of its gain."""
    phases = [
        {"request_rate": 6, "duration_s": 30, "input_len": 300, "output_len": 60},
        {"request_rate": 3, "duration_s": 30, "input_len": 2000, "output_len": 20},
    ]
    out = tmp_path / "r.json"
    args = ["simulate", "--device", "rtx5090", "--model", "llama-2-7b", "--phases", json.dumps(phases)]
    args += ["--topology-policy", "auto", "--candidates", "TP8,DP2xTP4,DP8xTP1", "--oracle", "--oracle-window-s", "15"]
    assert main([*args, "--save-result", str(out)]) == 0
    r = json.loads(out.read_text())
    o = r["oracle"]
    assert set(o["fixed_goodput_req_s"]) == {"TP8xPP1", "DP2xTP4xPP1", "DP8xTP1xPP1"} == set(r["candidates"])
    assert o["goodput_req_s"] >= o["best_fixed_goodput_req_s"] > 0 and len(o["schedules_tried"]) == 2
    assert r["device"] == "1x8 rtx5090" and r["completed"] == r["requests"]
    assert o["this_run_vs_best_fixed"] == pytest.approx(r["goodput_req_s"] / o["best_fixed_goodput_req_s"], abs=1e-3)
