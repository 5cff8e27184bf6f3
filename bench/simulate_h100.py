"""The policy at paper scale: Llama-2-70B (and 7B) on a simulated 8x H100 node, fixed TP8 / TP4xPP2 / TP2xPP4 /
TP1xPP8 against the policy switching live and the same policy switching by restart, on the Azure conversation
trace at three loads and on a phased workload. Also the switch times remp's planner predicts at NVLink bandwidth.

    python bench/simulate_h100.py [--model llama-2-70b] [--duration-s 600] [--jobs 2]

Writes bench/results/sim-h100-<model>.json (+ the policy's timeline on the phased workload as PNG) and prints a
markdown table per workload: goodput under the model's SLOs, TTFT and TPOT p50/p99, throughput, switches.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path

from remp.bench.results import RESULTS_DIR, save_result
from remp.planner.mode import LIVE, STOP
from remp.sim.cli import add_cli_args, simulate

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces" / "azure_conv_2023.csv"
# trace time scales: ~40%, ~65% and ~90% of TP8's predicted capacity for the trace's length mix
SCALES = {"llama-2-70b": (1.0, 0.6, 0.45), "llama-2-7b": (0.3, 0.18, 0.13)}
# chat, then a burst of long prompts (summarisation / RAG), then chat again: the rates sit between the fixed
# topologies' capacities for each mix (from the performance model), so no fixed topology fits both
PHASES = {
    "llama-2-70b": [(11.5, 1000, 200), (6, 4000, 50), (11.5, 1000, 200)],
    "llama-2-7b": [(46, 1000, 200), (42, 4000, 50), (46, 1000, 200)],
}
SETUPS = {
    "TP8xPP1": ["-tp", "8"],
    "TP4xPP2": ["-tp", "4", "-pp", "2"],
    "TP2xPP4": ["-tp", "2", "-pp", "4"],
    "TP1xPP8": ["-tp", "1", "-pp", "8"],
    "policy (live)": ["--topology-policy", "auto"],
    "policy (restart)": ["--topology-policy", "auto", "--restart-policy"],
}


def phases_json(model: str, phase_s: float) -> str:
    names = ("chat", "long prompts", "chat")
    return json.dumps(
        [
            {"name": n, "request_rate": r, "duration_s": phase_s, "input_len": i, "output_len": o, "range_ratio": 0.5}
            for n, (r, i, o) in zip(names, PHASES[model])
        ]
    )


def one(job: tuple[str, str, list[str]]) -> tuple[str, str, dict]:
    workload, setup, argv = job
    p = argparse.ArgumentParser()
    add_cli_args(p)
    r = simulate(p.parse_args(argv))
    keep = ("completed", "failed", "duration_s", "throughput_tok_s", "goodput_req_s", "ttft_ms", "tpot_ms", "switches")
    return workload, setup, {k: r[k] for k in keep} | {"decisions": r["decisions"]["counts"], "slo_ms": r["slo_ms"]}


def switch_times(model: str) -> list[dict]:
    from remp.policy.h100 import H100Model
    from remp.policy.switch_cost import SwitchCostModel
    from remp.sim.models import model_config

    config = model_config(model)
    perf = H100Model(config, model)
    costs = SwitchCostModel(config, perf.p2p_bandwidth_Bps, 16)
    shapes = [(8, 1), (4, 2), (2, 4), (1, 8)]
    out = []
    blocks = perf.kv_capacity_tokens(8, 1) // 16 // 4  # a KV cache a quarter full
    for a in shapes:
        for b in shapes:
            if a != b:
                m = costs.moves(a, b)
                out.append(
                    {
                        "from": f"TP{a[0]}xPP{a[1]}",
                        "to": f"TP{b[0]}xPP{b[1]}",
                        "weights_GB": round(m.weight_bytes / 1e9, 1),
                        "kv_GB_quarter_full": round(m.kv_bytes_per_block * blocks / 1e9, 1),
                        "stop_pause_s": round(costs.cost(a, b, STOP, blocks).pause_s, 3),
                        "live_precopy_s": round(costs.cost(a, b, LIVE, blocks).precopy_s, 3),
                        "live_pause_s": round(costs.cost(a, b, LIVE, blocks).pause_s, 3),
                        "restart_s": round(costs.overheads.restart_s, 1),
                    }
                )
    return out


def table(result: dict) -> str:
    lines = []
    for workload, rows in result["runs"].items():
        slo = next(iter(rows.values()))["slo_ms"]
        best = max(v["goodput_req_s"] for k, v in rows.items() if k.startswith("TP"))
        lines += [
            f"**{workload}** (SLO TTFT {slo['ttft']:.0f} ms, TPOT {slo['tpot']:.0f} ms)",
            "",
            "| setup | goodput req/s | vs best fixed | TTFT p50 / p99 ms | TPOT p50 / p99 ms | output tok/s | switches |",
            "|---|---|---|---|---|---|---|",
        ]
        for setup, v in rows.items():
            sw = ", ".join(f"{s['time']:.0f}s→{s['to']}" for s in v["switches"]) or "-"
            lines.append(
                f"| {setup} | {v['goodput_req_s']:.2f} | {v['goodput_req_s'] / best:.2f}x "
                f"| {v['ttft_ms']['p50']:.0f} / {v['ttft_ms']['p99']:.0f} | {v['tpot_ms']['p50']:.1f} / {v['tpot_ms']['p99']:.1f} "
                f"| {v['throughput_tok_s']:.0f} | {sw} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-2-70b", choices=sorted(SCALES))
    p.add_argument("--duration-s", type=float, default=600.0, help="of each trace run (scaled clock)")
    p.add_argument("--phase-s", type=float, default=300.0)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    jobs = []
    for scale in SCALES[a.model]:
        name = f"Azure conversation trace x{1 / scale:.2g} load, first {a.duration_s:.0f} s"
        base = [
            "--model",
            a.model,
            "--trace",
            str(TRACE),
            "--time-scale",
            str(scale),
            "--duration-s",
            str(a.duration_s),
        ]
        jobs += [(name, s, base + extra) for s, extra in SETUPS.items()]
    name = "phased: chat / long prompts / chat"
    base = ["--model", a.model, "--phases", phases_json(a.model, a.phase_s)]
    for s, extra in SETUPS.items():
        png = ["--timeline", str(RESULTS_DIR / f"sim-h100-{a.model}-phased-policy.png")] if s == "policy (live)" else []
        jobs.append((name, s, base + extra + png))
    with mp.get_context("forkserver").Pool(a.jobs) as pool:
        done = pool.map(one, jobs, chunksize=1)
    runs: dict = {}
    for workload, setup, r in done:
        runs.setdefault(workload, {})[setup] = r
    result = {
        "model": a.model,
        "device": "8x H100 SXM (simulated from Vidur's measured operator and NVLink timings)",
        "runs": runs,
        "switch_times": switch_times(a.model),
    }
    print(table(result))
    save_result(result, f"sim-h100-{a.model}", dtype="bfloat16")  # the H100 model's (policy/h100.py)


if __name__ == "__main__":
    main()
