"""`remp simulate`: replay a workload through remp's scheduler, policy and planner on a simulated device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from remp.bench.metrics import compute_metrics, format_summary
from remp.planner.mode import MODE_NAMES, RESTART, switch_mode
from remp.policy.decide import PolicyConfig, TopologyPolicy
from remp.policy.observe import LoadWindow
from remp.policy.predict import Limits, Slo
from remp.sim.simulator import SimOptions, Simulator
from remp.topology import parse_shape, shape_name

# Chat SLOs from DistServe (Zhong et al., OSDI 2024, table 1: chatbot with OPT-66B 2.5 s / 0.15 s, OPT-13B 0.25 s /
# 0.1 s), for the Llama-2 models of the same sizes.
DEFAULT_SLOS_MS = {"llama-2-70b": (2500.0, 150.0), "llama-2-7b": (250.0, 100.0)}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-2-70b", help=f"{', '.join(sorted(DEFAULT_SLOS_MS))}; cpu-here: default")
    p.add_argument("--device", default="h100", choices=["h100", "cpu-here"], help="cpu-here: --perf-profile's machine")
    p.add_argument("--perf-profile", default=None, help="cpu-here: a profile from `remp profile`")
    p.add_argument(
        "--h100-data", default=None, help="h100: Vidur's profiling data (default: $REMP_H100_DATA, ../shared)"
    )
    p.add_argument("--schedule", default=None, help="switches at set times instead of a policy: TP4xPP1@0,TP1xPP4@20")
    p.add_argument("--num-gpus", type=int, default=8)
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--trace", help="CSV with arrived_at, num_prefill_tokens, num_decode_tokens")
    w.add_argument("--phases", help="phases as JSON (inline or a file), as for `remp bench serve --phases`")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply the trace's arrival times (0.5: twice the load)"
    )
    p.add_argument("--duration-s", type=float, default=None, help="only the arrivals of the first D seconds")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=None)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=None)
    p.add_argument("--topology-policy", choices=["manual", "auto"], default="manual")
    p.add_argument(
        "--candidates", default=None, help="comma-separated topologies the policy may pick, e.g. TP8xPP1,TP4xPP2"
    )
    p.add_argument(
        "--switch-mode", choices=MODE_NAMES, default="live", help="how the policy's switches are carried out"
    )
    p.add_argument("--restart-policy", action="store_true", help="the same policy, but every switch is a restart")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--policy-interval-s", type=float, default=5.0)
    p.add_argument("--policy-window-s", type=float, default=30.0, help="the load is measured over this window")
    p.add_argument("--min-dwell-s", type=float, default=60.0)
    p.add_argument("--horizon-s", type=float, default=120.0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--timeline", default=None, metavar="FILE.png")


def device_setup(a: argparse.Namespace):
    """(model config, performance model, switch costs, the shapes the device allows, default SLOs in s)."""
    from remp.planner.choose import candidates as all_candidates
    from remp.policy.switch_cost import SwitchCostModel

    if a.device == "h100":
        from remp.policy.h100 import H100Model
        from remp.sim.models import model_config

        config = model_config(a.model)
        perf = H100Model(config, a.model, a.h100_data)
        # every shape of up to num_gpus GPUs that the figures cover (TP 1, 2, 4, 8); the whole node's first
        shapes = sorted(
            ((t.tp, t.pp) for n in range(1, a.num_gpus + 1) for t in all_candidates(config, n) if t.tp in (1, 2, 4, 8)),
            key=lambda s: (-s[0] * s[1], s),
        )
        costs = SwitchCostModel(config, perf.p2p_bandwidth_Bps, a.block_size)
        ttft, tpot = DEFAULT_SLOS_MS[a.model]
        return config, perf, costs, shapes, (ttft / 1e3, tpot / 1e3)
    from remp.model.reader import open_checkpoint
    from remp.policy.measured import MeasuredModel, Profile, default_slo, switch_costs

    if not a.perf_profile:
        raise ValueError("--device cpu-here needs --perf-profile (make one with `remp profile`)")
    profile = Profile.load(a.perf_profile)
    config = open_checkpoint(None if a.model == "default" else a.model).config
    perf = MeasuredModel(profile)
    shapes = [parse_shape(n) for n in profile.fits]
    costs = switch_costs(profile, config, a.block_size)
    ttft, tpot = default_slo(perf, shapes)
    return config, perf, costs, shapes, (ttft, tpot)


def simulate(a: argparse.Namespace) -> dict:
    from remp.sim.workload import phased_requests, trace_requests

    if a.trace:
        requests = trace_requests(a.trace, a.time_scale, a.duration_s, a.max_model_len)
        windows = None
    else:
        requests, windows = phased_requests(a.phases, a.seed, max_model_len=a.max_model_len)
    if not requests:
        raise ValueError("the workload has no requests (check --duration-s and the trace)")
    config, perf, costs, shapes, (ttft_s, tpot_s) = device_setup(a)
    candidates = [s for s in shapes if s[0] * s[1] == max(x * y for x, y in shapes)]  # the whole node
    if a.candidates:
        candidates = [parse_shape(c) for c in a.candidates.split(",") if c.strip()]
        if bad := [shape_name(c) for c in candidates if c not in shapes]:
            raise ValueError(
                f"unknown candidate(s) {', '.join(bad)}; the device allows {', '.join(map(shape_name, shapes))}"
            )
    schedule = []
    for item in (a.schedule or "").split(","):
        if item.strip():
            topo, _, at = item.partition("@")
            schedule.append((float(at or 0), parse_shape(topo)))
    if a.topology_policy == "auto":
        if a.tensor_parallel_size or a.pipeline_parallel_size:
            start = (a.tensor_parallel_size or 1, a.pipeline_parallel_size or 1)
        else:
            start = max(candidates)  # the widest TP: lowest latency while the policy has seen nothing
        if start not in candidates:
            raise ValueError(f"the starting topology {shape_name(start)} is not among the candidates")
    elif schedule:
        start = schedule.pop(0)[1]
    else:
        start = (a.tensor_parallel_size or 1, a.pipeline_parallel_size or 1)
    if start not in shapes or any(t not in shapes for _, t in schedule):
        raise ValueError(
            f"the device runs {', '.join(map(shape_name, shapes))}; {shape_name(start)} is not one of them"
        )
    slo = Slo(a.slo_ttft_ms / 1e3 if a.slo_ttft_ms else ttft_s, a.slo_tpot_ms / 1e3 if a.slo_tpot_ms else tpot_s)
    mode = RESTART if a.restart_policy else switch_mode(a.switch_mode)
    opts = SimOptions(a.block_size, a.max_num_seqs, a.max_num_batched_tokens, mode)
    policy = None
    if a.topology_policy == "auto":
        cfg = PolicyConfig(slo, a.policy_interval_s, a.min_dwell_s, a.horizon_s)
        limits = Limits(a.max_num_seqs, a.max_num_batched_tokens)
        policy = TopologyPolicy(perf, candidates, limits, cfg, lambda old, new: costs.cost(old, new, mode, 0))
    sim = Simulator(perf, requests, start, opts, costs, policy, LoadWindow(a.policy_window_s), schedule)
    run = sim.run()
    slos = {"ttft": slo.ttft_s * 1e3, "tpot": slo.tpot_s * 1e3}
    m = compute_metrics(run.results, run.duration_s, (50, 99), slos)
    result = {
        "model": a.model,
        "device": f"{a.num_gpus}x {a.device}",
        "workload": {"trace": a.trace, "time_scale": a.time_scale, "duration_s": a.duration_s}
        if a.trace
        else {"phases": a.phases},
        "requests": len(requests),
        "topology_policy": a.topology_policy,
        "switch_mode": mode.name if policy else None,
        "start_topology": shape_name(start),
        "candidates": [shape_name(c) for c in candidates] if policy else None,
        "slo_ms": slos,
        "completed": m["completed"],
        "failed": m["failed"],
        "duration_s": run.duration_s,
        "throughput_tok_s": m["output_throughput"],
        "goodput_req_s": m["request_goodput"],
        "ttft_ms": {"p50": m["median_ttft_ms"], "p99": m["p99_ttft_ms"]},
        "tpot_ms": {"p50": m["median_tpot_ms"], "p99": m["p99_tpot_ms"]},
        "switches": run.switches,
        "decisions": {"counts": dict(policy.counts) if policy else {}, "last": run.decisions[-20:]},
        "topology_timeline": run.topology_timeline,
        "steps": run.steps,
        "metrics": m,
    }
    if windows:
        result["phases"] = [w.__dict__ for w in windows]
    if a.save_result:
        Path(a.save_result).parent.mkdir(parents=True, exist_ok=True)
        Path(a.save_result).write_text(json.dumps(result, indent=2, default=str))
    if a.timeline:
        from remp.bench.timeline import plot_timeline

        title = f"remp simulate: {a.model} on {a.num_gpus}x {a.device}, " + (
            f"policy ({mode})" if policy else shape_name(start)
        )
        plot_timeline(a.timeline, run.results, run.duration_s, run.switches, windows, title)
    return result


def run_cli(a: argparse.Namespace) -> int:
    r = simulate(a)
    print(format_summary(r["metrics"], title="remp simulate", percentiles=(50, 99)))
    for s in r["switches"]:
        print(
            f"switch at {s['time']:.1f} s: {s['from']} -> {s['to']} ({s['mode']}, pause {s['pause_s'] * 1e3:.0f} ms): {s['reason']}"
        )
    if r["decisions"]["counts"]:
        print(f"policy decisions: {r['decisions']['counts']}")
    return 0
