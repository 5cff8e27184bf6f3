"""`remp simulate`: replay a workload through remp's scheduler, policy and planner on a simulated device."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from remp.bench.datasets import SampleRequest
from remp.bench.metrics import RequestResult, compute_metrics, format_summary
from remp.config import ModelConfig
from remp.nodes import Links
from remp.planner.mode import MODE_NAMES, RESTART, switch_mode
from remp.policy.decide import PolicyConfig, TopologyPolicy
from remp.policy.observe import LoadWindow
from remp.policy.perf_model import PerfModel
from remp.policy.predict import Limits, Slo
from remp.policy.switch_cost import SwitchCostModel
from remp.sim.oracle import best_schedule, switch_loss, window_concurrency, window_values
from remp.sim.simulator import SimOptions, SimResult, Simulator
from remp.topology import Shape, parse_shape, shape_name

# Chat SLOs from DistServe (Zhong et al., OSDI 2024, table 1: chatbot with OPT-66B 2.5 s / 0.15 s, OPT-13B 0.25 s /
# 0.1 s), for the Llama-2 models of the same sizes.
DEFAULT_SLOS_MS = {"llama-2-70b": (2500.0, 150.0), "llama-2-7b": (250.0, 100.0)}
DEVICES = ("h100", "rtx5090", "cpu-here")
THRASH_WINDOW_S = 300.0  # a return to the previous topology within this long is a round trip (thrash)


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama-2-70b", help=f"{', '.join(sorted(DEFAULT_SLOS_MS))}; cpu-here: default")
    p.add_argument(
        "--device",
        default="h100",
        choices=DEVICES,
        help="h100: 8x H100 SXM nodes (Vidur's figures); rtx5090: 8 RTX 5090-class GPUs on PCIe 5 per node (roofline "
        "of the published peaks); cpu-here: --perf-profile's machine",
    )
    p.add_argument("--perf-profile", default=None, help="cpu-here: a profile from `remp profile`")
    p.add_argument(
        "--h100-data", default=None, help="h100: Vidur's profiling data (default: $REMP_H100_DATA, ../shared)"
    )
    p.add_argument("--schedule", default=None, help="switches at set times instead of a policy: TP4xPP1@0,TP1xPP4@20")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs in use (default: every GPU of the nodes)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes of 8 GPUs (InfiniBand between them)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--trace", help="CSV with arrived_at, num_prefill_tokens, num_decode_tokens")
    w.add_argument("--phases", help="phases as JSON (inline or a file), as for `remp bench serve --phases`")
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply the trace's arrival times (0.5: twice the load)"
    )
    p.add_argument("--reverse", action="store_true", help="replay the trace backwards in time (its mix drifts back)")
    p.add_argument("--duration-s", type=float, default=None, help="only the arrivals of the first D seconds")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=None)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=None)
    p.add_argument("-dp", "--data-parallel-size", type=int, default=None, help="replicas, each TP x PP")
    p.add_argument("--topology-policy", choices=["manual", "auto"], default="manual")
    p.add_argument(
        "--candidates",
        default=None,
        help="topologies the policy may pick, e.g. TP8xPP1,TP4xPP2,DP2xTP4 (default: the TP x PP shapes of every "
        "GPU; 'all': data-parallel shapes too)",
    )
    p.add_argument(
        "--switch-mode", choices=MODE_NAMES, default="live", help="how the policy's switches are carried out"
    )
    p.add_argument("--restart-policy", action="store_true", help="the same policy, but every switch is a restart")
    p.add_argument(
        "--oracle",
        action="store_true",
        help="also run every candidate fixed and the best schedule in hindsight (windows x candidates, switch costs "
        "included), and report the policy's share of the oracle's gain over the best fixed topology",
    )
    p.add_argument("--oracle-window-s", type=float, default=30.0)
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


@dataclass
class Setup:
    """A simulated device serving a model: its performance, switch costs, shapes and SLOs."""

    model: str
    device: str
    config: ModelConfig
    perf: PerfModel
    costs: SwitchCostModel
    shapes: list[Shape]  # every shape the device runs
    slo: Slo
    options: SimOptions
    limits: Limits


def _gpu_shapes(config: ModelConfig, perf, gpus: int) -> list[Shape]:
    """Every DP x TP x PP of up to `gpus` GPUs the model splits into and whose KV cache is not empty; the whole
    pool's first."""
    from remp.planner.choose import candidates as all_candidates

    out = []
    for n in range(1, gpus + 1):
        for t in all_candidates(config, n):
            if not perf.supports_tp(t.tp) or perf.kv_capacity_tokens(t.tp, t.pp) <= 0:
                continue
            out += [Shape(t.tp, t.pp, dp) for dp in range(1, gpus // n + 1)]
    return sorted(set(out), key=lambda s: (-s.size, s.dp, -s.tp, s.pp))


def device_setup(a: argparse.Namespace) -> Setup:
    """The device, model, costs and SLOs the arguments describe."""
    mode = RESTART if a.restart_policy else switch_mode(a.switch_mode)
    options = SimOptions(a.block_size, a.max_num_seqs, a.max_num_batched_tokens, mode)
    limits = Limits(a.max_num_seqs, a.max_num_batched_tokens)
    if a.device in ("h100", "rtx5090"):
        from remp.policy.gpu import rtx5090_model
        from remp.policy.h100 import H100Model
        from remp.sim.models import model_config

        if a.num_nodes < 1:
            raise ValueError("--num-nodes must be >= 1")
        config = model_config(a.model)
        if a.device == "h100":
            perf = H100Model(config, a.model, a.h100_data, nodes=a.num_nodes)
        else:
            perf = rtx5090_model(config, a.model, nodes=a.num_nodes)
        gpus = a.num_gpus or perf.num_gpus
        if not 1 <= gpus <= perf.num_gpus:
            raise ValueError(f"--num-gpus {gpus}: the {a.num_nodes} node(s) have {perf.num_gpus} GPUs")
        per_node = perf.fabric.per_node
        intra, inter = perf.fabric.bandwidths_Bps()
        links = Links(tuple(w // per_node for w in range(perf.num_gpus)), intra, inter)
        costs = SwitchCostModel(config, intra, a.block_size, links=links)
        ttft, tpot = DEFAULT_SLOS_MS[a.model]
        slo = Slo(ttft / 1e3, tpot / 1e3)
        shapes = _gpu_shapes(config, perf, gpus)
    else:
        from remp.model.reader import open_checkpoint
        from remp.policy.measured import MeasuredModel, Profile, default_slo, switch_costs

        if not a.perf_profile:
            raise ValueError("--device cpu-here needs --perf-profile (make one with `remp profile`)")
        profile = Profile.load(a.perf_profile)
        config = open_checkpoint(None if a.model == "default" else a.model).config
        perf = MeasuredModel(profile)
        shapes = [parse_shape(n) for n in profile.fits]
        costs = switch_costs(profile, config, a.block_size)
        slo = Slo(*default_slo(perf, shapes))
    slo = Slo(
        a.slo_ttft_ms / 1e3 if a.slo_ttft_ms else slo.ttft_s, a.slo_tpot_ms / 1e3 if a.slo_tpot_ms else slo.tpot_s
    )
    device = a.device if a.device == "cpu-here" else f"{a.num_nodes}x8 {a.device}"
    return Setup(a.model, device, config, perf, costs, shapes, slo, options, limits)


def pick_candidates(setup: Setup, text: str | None) -> list[Shape]:
    whole = max(s.size for s in setup.shapes)
    if not text or text == "all":
        return [s for s in setup.shapes if s.size == whole and (text == "all" or s.dp == 1)]
    wanted = [parse_shape(c) for c in text.split(",") if c.strip()]
    if bad := [shape_name(c) for c in wanted if c not in setup.shapes]:
        raise ValueError(
            f"unknown candidate(s) {', '.join(bad)}; the device allows {', '.join(map(shape_name, setup.shapes))}"
        )
    return wanted


def load_workload(a: argparse.Namespace) -> tuple[list[SampleRequest], list | None]:
    from remp.sim.workload import phased_requests, reversed_requests, trace_requests

    if a.trace:
        requests = trace_requests(a.trace, a.time_scale, None if a.reverse else a.duration_s, a.max_model_len)
        if a.reverse:
            requests = reversed_requests(requests, a.duration_s)
        windows = None
    else:
        requests, windows = phased_requests(a.phases, a.seed, max_model_len=a.max_model_len)
    if not requests:
        raise ValueError("the workload has no requests (check --duration-s and the trace)")
    return requests, windows


def make_policy(setup: Setup, candidates: list[Shape], a: argparse.Namespace) -> TopologyPolicy:
    cfg = PolicyConfig(setup.slo, a.policy_interval_s, a.min_dwell_s, a.horizon_s)
    mode, costs = setup.options.switch_mode, setup.costs
    return TopologyPolicy(
        setup.perf, candidates, setup.limits, cfg, lambda old, new: costs.cost(old, new, mode, 0), a.policy_window_s
    )


def run_sim(
    setup: Setup,
    requests: list[SampleRequest],
    start: Shape,
    policy: TopologyPolicy | None = None,
    schedule: list[tuple[float, Shape]] | None = None,
    window_s: float = 30.0,
) -> SimResult:
    sim = Simulator(setup.perf, requests, start, setup.options, setup.costs, policy, LoadWindow(window_s), schedule)
    return sim.run()


def slos_ms(setup: Setup) -> dict[str, float]:
    return {"ttft": setup.slo.ttft_s * 1e3, "tpot": setup.slo.tpot_s * 1e3}


def goodput(setup: Setup, run: SimResult) -> float:
    return compute_metrics(run.results, run.duration_s, (50,), slos_ms(setup))["request_goodput"]


def round_trips(switches: list[dict], within_s: float = THRASH_WINDOW_S) -> int:
    """A -> B -> A with the return within `within_s` of the first switch: thrash."""
    return sum(1 for a, b in zip(switches, switches[1:]) if a["from"] == b["to"] and b["time"] - a["time"] <= within_s)


def windows_of(requests: list[SampleRequest], window_s: float) -> int:
    return int(max(r.arrival_s for r in requests) // window_s) + 1


def isolated_results(setup: Setup, requests: list[SampleRequest], shape: Shape, window_s: float) -> list[RequestResult]:
    """`shape` serving each window's arrivals from an empty start, without the backlog of the windows before (a
    topology switched to at a window's start need not inherit its own past): the results, on the run's clock."""
    out = []
    for w in range(windows_of(requests, window_s)):
        mine = [r for r in requests if w * window_s <= r.arrival_s < (w + 1) * window_s]
        if not mine:
            continue
        start = w * window_s
        shifted = [SampleRequest(r.prompt, r.prompt_len, r.output_len, r.arrival_s - start, r.phase) for r in mine]
        for res in run_sim(setup, shifted, shape).results:
            res.send_time += start
            out.append(res)
    return out


def oracle_schedule(
    setup: Setup,
    requests: list[SampleRequest],
    candidates: list[Shape],
    window_s: float,
    results: dict[Shape, list[RequestResult]],
) -> tuple[float, list[tuple[float, Shape]]]:
    """The best piecewise-constant schedule in hindsight (sim/oracle.py), valuing each window on each candidate
    by `results` (its fixed run, or its isolated windows): the schedule's value in good requests, and its
    switches as (time, shape), the first at 0."""
    windows = windows_of(requests, window_s)
    values = {c: window_values(results[c], window_s, windows, slos_ms(setup)) for c in candidates}
    mean_kv = sum(r.prompt_len + r.output_len / 2 for r in requests) / len(requests)
    mode, size = setup.options.switch_mode, setup.options.block_size
    losses = {
        c: switch_loss(
            setup.costs, mode, setup.slo.ttft_s, mean_kv, size, window_concurrency(results[c], window_s, windows)
        )
        for c in candidates
    }
    value, path = best_schedule(values, lambda a, b, w: losses[a](a, b, w))
    return value, [(w * window_s, c) for w, c in enumerate(path) if w == 0 or c != path[w - 1]]


def oracle(
    setup: Setup,
    requests: list[SampleRequest],
    candidates: list[Shape],
    window_s: float,
    fixed: dict[Shape, SimResult] | None = None,
) -> dict:
    """Every candidate fixed, and the best schedule in hindsight among them: two dynamic programmes, one valuing
    windows by the fixed runs (each window with the backlog its topology built before), one by isolated windows
    (none); both schedules simulated, and the best of them and the best fixed topology kept. `fixed`: runs
    already made."""
    fixed = dict(fixed or {})
    for c in candidates:
        if c not in fixed:
            fixed[c] = run_sim(setup, requests, c)
    good = {c: goodput(setup, fixed[c]) for c in candidates}
    plans = [
        oracle_schedule(setup, requests, candidates, window_s, {c: fixed[c].results for c in candidates}),
        oracle_schedule(
            setup,
            requests,
            candidates,
            window_s,
            {c: isolated_results(setup, requests, c, window_s) for c in candidates},
        ),
    ]
    tried = []
    for value, schedule in plans:
        if len(schedule) > 1:
            achieved = goodput(setup, run_sim(setup, requests, schedule[0][1], schedule=schedule[1:]))
        else:
            achieved = good[schedule[0][1]]
        tried.append((achieved, value, schedule))
    return oracle_summary(good, tried, window_s)


def oracle_summary(
    good: dict[Shape, float], tried: list[tuple[float, float, list[tuple[float, Shape]]]], window_s: float
) -> dict:
    """The oracle's figures from the fixed runs' goodputs and the schedules tried (simulated goodput, the
    programme's value, the schedule): the best of them, or the best fixed topology where none beats it."""
    best_fixed = max(good, key=lambda c: good[c])
    achieved, value, schedule = max(tried, key=lambda t: t[0])
    best = max(achieved, good[best_fixed])
    return {
        "window_s": window_s,
        "fixed_goodput_req_s": {str(c): round(g, 4) for c, g in good.items()},
        "best_fixed": str(best_fixed),
        "best_fixed_goodput_req_s": round(good[best_fixed], 4),
        "schedules_tried": [
            {
                "goodput_req_s": round(g, 4),
                "value_good_requests": round(v, 1),
                "schedule": [(round(t, 1), str(c)) for t, c in s],
            }
            for g, v, s in tried
        ],
        "schedule": [(round(t, 1), str(c)) for t, c in schedule]
        if achieved >= good[best_fixed]
        else [(0.0, str(best_fixed))],
        "goodput_req_s": round(best, 4),
        "gain_over_best_fixed": round(best / good[best_fixed], 4) if good[best_fixed] > 0 else None,
    }


def simulate(a: argparse.Namespace) -> dict:
    requests, windows = load_workload(a)
    setup = device_setup(a)
    candidates = pick_candidates(setup, a.candidates)
    schedule = []
    for item in (a.schedule or "").split(","):
        if item.strip():
            topo, _, at = item.partition("@")
            schedule.append((float(at or 0), parse_shape(topo)))
    given = Shape(a.tensor_parallel_size or 1, a.pipeline_parallel_size or 1, a.data_parallel_size or 1)
    explicit = any(x for x in (a.tensor_parallel_size, a.pipeline_parallel_size, a.data_parallel_size))
    if a.topology_policy == "auto":
        start = given if explicit else max(candidates)  # the widest TP: lowest latency while nothing is seen
        if start not in candidates:
            raise ValueError(f"the starting topology {start} is not among the candidates")
    elif schedule:
        start = schedule.pop(0)[1]
    else:
        start = given
    if start not in setup.shapes or any(t not in setup.shapes for _, t in schedule):
        raise ValueError(f"the device runs {', '.join(map(shape_name, setup.shapes))}; {start} is not one of them")
    policy = make_policy(setup, candidates, a) if a.topology_policy == "auto" else None
    run = run_sim(setup, requests, start, policy, schedule, a.policy_window_s)
    slos = slos_ms(setup)
    m = compute_metrics(run.results, run.duration_s, (50, 99), slos)
    mode = setup.options.switch_mode
    result = {
        "model": a.model,
        "device": setup.device,
        "performance_model": setup.perf.name,
        "workload": {"trace": a.trace, "time_scale": a.time_scale, "duration_s": a.duration_s, "reverse": a.reverse}
        if a.trace
        else {"phases": a.phases},
        "requests": len(requests),
        "topology_policy": a.topology_policy,
        "switch_mode": mode.name if policy else None,
        "start_topology": str(start),
        "candidates": [str(c) for c in candidates] if policy or a.oracle else None,
        "slo_ms": slos,
        "completed": m["completed"],
        "failed": m["failed"],
        "duration_s": run.duration_s,
        "throughput_tok_s": m["output_throughput"],
        "goodput_req_s": m["request_goodput"],
        "ttft_ms": {"p50": m["median_ttft_ms"], "p99": m["p99_ttft_ms"]},
        "tpot_ms": {"p50": m["median_tpot_ms"], "p99": m["p99_tpot_ms"]},
        "switches": run.switches,
        "reverts": sum(1 for s in run.switches if s["reason"].startswith("regret")),
        "thrash": round_trips(run.switches),
        "decisions": {
            "counts": dict(policy.counts) if policy else {},
            "calibration": policy.calibration.to_json() if policy else {},
            "last": run.decisions[-20:],
        },
        "topology_timeline": run.topology_timeline,
        "steps": run.steps,
        "metrics": m,
    }
    if a.oracle:
        o = oracle(setup, requests, candidates, a.oracle_window_s, {start: run} if policy is None else None)
        base = o["best_fixed_goodput_req_s"]
        gain = o["goodput_req_s"] - base
        o["this_run_vs_best_fixed"] = round(m["request_goodput"] / base, 4) if base > 0 else None
        o["this_run_share_of_oracle_gain"] = round((m["request_goodput"] - base) / gain, 4) if gain > 1e-9 else None
        result["oracle"] = o
    if windows:
        result["phases"] = [w.__dict__ for w in windows]
    if a.save_result:
        Path(a.save_result).parent.mkdir(parents=True, exist_ok=True)
        Path(a.save_result).write_text(json.dumps(result, indent=2, default=str))
    if a.timeline:
        from remp.bench.timeline import plot_timeline

        title = f"remp simulate: {a.model} on {setup.device}, " + (f"policy ({mode})" if policy else str(start))
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
        print(f"policy decisions: {r['decisions']['counts']}; round trips (thrash): {r['thrash']}")
    if "oracle" in r:
        o = r["oracle"]
        print(
            f"oracle: best fixed {o['best_fixed']} {o['best_fixed_goodput_req_s']:.3f} req/s; best schedule in "
            f"hindsight {o['goodput_req_s']:.3f} req/s ({o['gain_over_best_fixed']}x); this run "
            f"{o['this_run_vs_best_fixed']}x the best fixed, {o['this_run_share_of_oracle_gain']} of the oracle's gain"
        )
    return 0
