"""The topology policy against standing still and against hindsight, per device setting and workload: every
candidate fixed, `--topology-policy auto` (switching live), and the oracle (the best piecewise-constant schedule
in hindsight over 30 s windows, switch costs included, simulated). One table row per workload: best fixed,
auto, their ratio, the oracle's gain over the best fixed, the policy's share of that gain, switches (regret
reverts), round trips (A -> B -> A within 300 s). The oracle is the best of two dynamic programmes' schedules,
simulated: one values each window by the candidates' fixed runs, one by each window served alone (sim/cli.py).

    python bench/policy_study.py [--settings h100-8x70b,...] [--workloads conv-x1,...] [--jobs 2]

Settings (the same policy and defaults everywhere; no per-workload knobs):
- h100-8x70b: Llama-2-70B on one 8x H100 SXM node, TP x PP shapes (the issue's setting);
- h100-16x70b: Llama-2-70B on 2 x 8 H100 (InfiniBand between the nodes), TP x PP shapes of 16 GPUs;
- rtx5090-8x7b: Llama-2-7B on 8 RTX 5090-class GPUs on PCIe 5 (no NVLink), TP x PP shapes;
- h100-8x7b-dp: Llama-2-7B on one 8x H100 node, DP x TP x PP shapes (data-parallel replicas, a router).

Workloads, each set from the model's predictions by one rule for every setting (never from the results):
- conv-xN: the Azure conversation trace (first 1200 s), scaled to 40%, 65% and 90% of the best candidate's
  predicted capacity for the trace's mean mix (h100-8x70b keeps issue 13's scales x1, x1.7, x2.2);
- conv-reversed: the same trace played backwards from its end (its mix and load drift the other way), at the
  middle load: not tuned on;
- phased: chat (1000 in / 200 out), long prompts (4000 / 50), chat, 300 s each, each phase's rate at 90% of the
  best candidate's predicted capacity for its mix, so the best topology differs between phases;
- gamma-drift: bursty Gamma arrivals (CV 2) whose prompts swing 300 -> 3000 -> 300 tokens (outputs 300 -> 40)
  over 600 s, twice, at 60% of the best candidate's predicted token capacity at the middle mix: not tuned on.

Writes bench/results/policy-study-<setting>.json and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

from remp.bench.metrics import compute_metrics
from remp.bench.results import git_state, save_result
from remp.policy.predict import Load, predict
from remp.sim.cli import (
    add_cli_args,
    device_setup,
    isolated_results,
    load_workload,
    make_policy,
    oracle_schedule,
    oracle_summary,
    pick_candidates,
    round_trips,
    run_sim,
    slos_ms,
)
from remp.sim.workload import drifting_gamma_phases
from remp.topology import parse_shape

RESULTS = Path(__file__).parent / "results"
TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces" / "azure_conv_2023.csv"
DURATION_S = 1200.0
SETTINGS = {
    "h100-8x70b": ["--device", "h100", "--model", "llama-2-70b"],
    "h100-16x70b": ["--device", "h100", "--model", "llama-2-70b", "--num-nodes", "2"],
    "rtx5090-8x7b": ["--device", "rtx5090", "--model", "llama-2-7b"],
    "h100-8x7b-dp": ["--device", "h100", "--model", "llama-2-7b", "--candidates", "all"],
}
ISSUE_13_SCALES = {"h100-8x70b": (1.0, 0.6, 0.45)}
LOADS = (0.4, 0.65, 0.9)
WORKLOADS = ("conv-x1", "conv-x2", "conv-x3", "conv-reversed", "phased", "gamma-drift")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cli_args(p)
    return p.parse_args(argv)


def trace_mix() -> tuple[float, float, float]:
    """(mean rate, prompt, output) of the trace's first DURATION_S seconds."""
    from remp.sim.workload import trace_requests

    reqs = trace_requests(TRACE, 1.0, DURATION_S, 4096)
    n = len(reqs)
    return n / DURATION_S, sum(r.prompt_len for r in reqs) / n, sum(r.output_len for r in reqs) / n


def best_capacity(setup, candidates, prompt: float, output: float, slo_capacity: bool = False) -> float:
    preds = [predict(setup.perf, c, Load(0.0, prompt, output), setup.limits, setup.slo) for c in candidates]
    return max(p.slo_capacity_req_s if slo_capacity else p.capacity_req_s for p in preds)


def workloads(setting: str) -> dict[str, list[str]]:
    """Each workload's arguments for `remp simulate`, from the rule in the module's docstring."""
    setup = device_setup(parse([*SETTINGS[setting], "--trace", str(TRACE)]))
    candidates = pick_candidates(setup, parse([*SETTINGS[setting], "--trace", str(TRACE)]).candidates)
    rate, p, o = trace_mix()
    cap = best_capacity(setup, candidates, p, o)
    scales = ISSUE_13_SCALES.get(setting) or tuple(round(rate / (f * cap), 3) for f in LOADS)
    trace = ["--trace", str(TRACE), "--duration-s", str(DURATION_S)]
    out = {f"conv-x{i + 1}": [*trace, "--time-scale", str(s)] for i, s in enumerate(scales)}
    out["conv-reversed"] = [*trace, "--time-scale", str(scales[1]), "--reverse"]
    mixes = [("chat", 1000, 200), ("long prompts", 4000, 50), ("chat", 1000, 200)]
    phases = [
        {
            "name": name,
            "request_rate": round(0.9 * best_capacity(setup, candidates, i, n), 2),
            "duration_s": 300,
            "input_len": i,
            "output_len": n,
            "range_ratio": 0.5,
        }
        for name, i, n in mixes
    ]
    out["phased"] = ["--phases", json.dumps(phases)]
    mid_p, mid_o = math.sqrt(300 * 3000), math.sqrt(300 * 40)
    tokens = 0.6 * best_capacity(setup, candidates, mid_p, mid_o) * (mid_p + mid_o)
    out["gamma-drift"] = ["--phases", json.dumps(drifting_gamma_phases(round(tokens), phases=20, period=10))]
    return out


def strip(results: list) -> list:
    for r in results:
        r.itl = []
    return results


def job(spec: tuple[str, str, str, list[str], list | None]) -> tuple[str, str, str, dict]:
    """One run: a fixed candidate, the policy, or a schedule; the summary and (fixed runs) the per-request
    results the oracle needs."""
    setting, workload, run, argv, schedule = spec
    t0 = time.perf_counter()
    a = parse(argv)
    setup = device_setup(a)
    requests, _ = load_workload(a)
    candidates = pick_candidates(setup, a.candidates)
    policy = None
    if run.startswith("isolated "):
        results = isolated_results(setup, requests, parse_shape(run.split()[1]), a.oracle_window_s)
        return setting, workload, run, {"results": strip(results), "wall_s": round(time.perf_counter() - t0, 1)}
    if run == "auto":
        policy = make_policy(setup, candidates, a)
        start = max(candidates)
    elif run.startswith("oracle"):
        start, schedule = schedule[0][1], schedule[1:]
    else:
        start = parse_shape(run)
    sim = run_sim(setup, requests, start, policy, schedule if run.startswith("oracle") else None, a.policy_window_s)
    m = compute_metrics(sim.results, sim.duration_s, (50, 99), slos_ms(setup))
    out = {
        "goodput_req_s": m["request_goodput"],
        "good_requests": m["good_requests"],
        "completed": m["completed"],
        "failed": m["failed"],
        "duration_s": sim.duration_s,
        "ttft_ms": {"p50": m["median_ttft_ms"], "p99": m["p99_ttft_ms"]},
        "tpot_ms": {"p50": m["median_tpot_ms"], "p99": m["p99_tpot_ms"]},
        "switches": sim.switches,
        "reverts": sum(1 for s in sim.switches if s["reason"].startswith("regret")),
        "round_trips": round_trips(sim.switches),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if policy is not None:
        out["calibration"] = policy.calibration.to_json()
        out["decisions"] = dict(policy.counts)
        out["decision_log"] = [d for d in sim.decisions if d["action"] == "switch" or d["observed"].get("factor")][-40:]
    if policy is None and not run.startswith("oracle"):
        out["results"] = strip(sim.results)
    return setting, workload, run, out


def study(setting: str, names: list[str], jobs: int) -> dict:
    specs = workloads(setting)
    argv0 = [*SETTINGS[setting], "--trace", str(TRACE)]
    setup = device_setup(parse(argv0))
    candidates = pick_candidates(setup, parse(argv0).candidates)
    first = []
    for w in names:
        argv = [*SETTINGS[setting], *specs[w]]
        first += [(setting, w, str(c), argv, None) for c in candidates] + [(setting, w, "auto", argv, None)]
        first += [(setting, w, f"isolated {c}", argv, None) for c in candidates]
    with mp.get_context("forkserver").Pool(jobs) as pool:
        done = pool.map(job, first, chunksize=1)
    runs: dict[str, dict] = {}
    isolated: dict[str, dict] = {}
    for _, w, run, out in done:
        if run.startswith("isolated "):
            isolated.setdefault(w, {})[parse_shape(run.split()[1])] = out["results"]
        else:
            runs.setdefault(w, {})[run] = out
    second, plans = [], {}
    for w in names:
        argv = [*SETTINGS[setting], *specs[w]]
        a = parse(argv)
        requests, _ = load_workload(a)
        fixed = {c: runs[w][str(c)].pop("results") for c in candidates}
        plans[w] = [
            oracle_schedule(setup, requests, candidates, a.oracle_window_s, fixed),
            oracle_schedule(setup, requests, candidates, a.oracle_window_s, isolated[w]),
        ]
        for k, (_, schedule) in enumerate(plans[w]):
            if len(schedule) > 1:
                second.append((setting, w, f"oracle {k}", argv, schedule))
    with mp.get_context("forkserver").Pool(jobs) as pool:
        for _, w, run, out in pool.map(job, second, chunksize=1):
            runs[w][run] = out
    table = {}
    for w in names:
        good = {c: runs[w][str(c)]["goodput_req_s"] for c in candidates}
        tried = []
        for k, (value, schedule) in enumerate(plans[w]):
            run = runs[w].get(f"oracle {k}")
            tried.append((run["goodput_req_s"] if run else good[schedule[0][1]], value, schedule))
        o = oracle_summary(good, tried, 30.0)
        auto = runs[w]["auto"]
        base, gain = o["best_fixed_goodput_req_s"], o["goodput_req_s"] - o["best_fixed_goodput_req_s"]
        table[w] = {
            "workload": specs[w],
            "oracle": o,
            "auto_goodput_req_s": round(auto["goodput_req_s"], 4),
            "auto_vs_best_fixed": round(auto["goodput_req_s"] / base, 4) if base > 0 else None,
            "policy_share_of_oracle_gain": round((auto["goodput_req_s"] - base) / gain, 3)
            if gain > 1e-3 * base
            else None,
            "switches": len(auto["switches"]),
            "reverts": auto["reverts"],
            "round_trips": auto["round_trips"],
        }
    return {"table": table, "runs": runs, "candidates": [str(c) for c in candidates], "slo_ms": slos_ms(setup)}


def markdown(setting: str, result: dict) -> str:
    lines = [
        f"**{setting}** (candidates {', '.join(result['candidates'])}; SLO TTFT {result['slo_ms']['ttft']:.0f} ms, "
        f"TPOT {result['slo_ms']['tpot']:.0f} ms)",
        "",
        "| workload | best fixed (goodput req/s) | auto | auto / best fixed | oracle gain | policy share | switches "
        "(reverts) | round trips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, r in result["table"].items():
        o = r["oracle"]
        share = "-" if r["policy_share_of_oracle_gain"] is None else f"{r['policy_share_of_oracle_gain']:.2f}"
        lines.append(
            f"| {w} | {o['best_fixed']} {o['best_fixed_goodput_req_s']:.2f} | {r['auto_goodput_req_s']:.2f} | "
            f"{r['auto_vs_best_fixed']:.2f}x | {o['gain_over_best_fixed']:.2f}x | {share} | "
            f"{r['switches']} ({r['reverts']}) | {r['round_trips']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for setting in a.settings.split(","):
        t0 = time.perf_counter()
        result = study(setting, a.workloads.split(","), a.jobs)
        out = RESULTS / f"policy-study-{setting}.json"
        # one run of this script may cover some workloads: the others' rows from earlier runs are kept (each row
        # says the commit and date it was simulated at)
        stamp = {"commit": git_state()["commit"], "date": datetime.date.today().isoformat()}
        for row in result["table"].values():
            row["simulated"] = stamp
        if out.exists():
            old = json.loads(out.read_text())
            result["table"] = {k: v for k, v in old["table"].items() if k not in result["table"]} | result["table"]
            result["runs"] = {k: v for k, v in old["runs"].items() if k not in result["runs"]} | result["runs"]
            result["table"] = {w: result["table"][w] for w in WORKLOADS if w in result["table"]}
        result |= {
            "setting": setting,
            "arguments": SETTINGS[setting],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        save_result(json.loads(json.dumps(result, default=str)), f"policy-study-{setting}", dtype="bfloat16")
        print(markdown(setting, result), flush=True)
        print(f"({result['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
