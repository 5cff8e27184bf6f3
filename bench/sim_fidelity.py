"""Does the simulator predict this machine? Replays bench/shifting.py's phases through `remp simulate --device
cpu-here` (the profile the live policy run used), for each variant that shifting.py measured live: the fixed
topologies, the scheduled switches, the policy. Prints throughput and median TTFT / TPOT, live vs simulated.

    python bench/sim_fidelity.py --profile bench/results/profile-cpu.json [--shifting bench/results/shifting.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from remp.bench.results import RESULTS_DIR, save_result
from remp.sim.cli import add_cli_args, simulate

KEYS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "request_goodput")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", required=True)
    p.add_argument("--shifting", default=str(RESULTS_DIR / "shifting.json"))
    a = p.parse_args()
    live = json.loads(Path(a.shifting).read_text())
    phases = json.dumps(live["phases"])
    slos = dict(x.split(":") for x in live["goodput_slo"])
    seconds = live["phases"][0]["duration_s"]
    rows = []
    for v in live["variants"]:
        name = v["variant"]
        argv = ["--device", "cpu-here", "--model", "default", "--perf-profile", a.profile, "--phases", phases]
        argv += ["--max-num-batched-tokens", "2048", "--max-model-len", "2048", "--seed", "0"]
        argv += ["--slo-ttft-ms", slos["ttft"], "--slo-tpot-ms", slos["tpot"]]
        if name.startswith("fixed-"):
            argv += ["--schedule", name.removeprefix("fixed-")]
        elif name.startswith("switch-"):
            shapes = live["schedule"].split(",")
            argv += ["--schedule", ",".join(f"{s}@{k * seconds}" for k, s in enumerate(shapes))]
        elif name == "policy-auto":
            argv += ["--topology-policy", "auto", "--policy-interval-s", "2", "--min-dwell-s", str(seconds / 2)]
            argv += ["--policy-window-s", str(seconds / 2), "--switch-mode", "live"]
        else:
            continue  # restarts: the simulator's restart cost is a model of a GPU server's, not this one's
        parser = argparse.ArgumentParser()
        add_cli_args(parser)
        sim = simulate(parser.parse_args(argv))
        m = sim["metrics"]
        rows.append(
            {
                "variant": name,
                "live": {k: v[k] for k in KEYS},
                "sim": {k: m[k] for k in KEYS},
                "sim_switches": [(s["time"], s["to"]) for s in sim["switches"]],
                "live_switches": v["events"],
            }
        )
    result = {"live": a.shifting, "live_date": live["date"], "profile": a.profile, "rows": rows}
    save_result(result, "sim-fidelity", dtype=live.get("dtype"))
    print(
        "| variant | out tok/s live / sim | median TTFT ms live / sim | median TPOT ms live / sim | goodput req/s live / sim |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        lv, sm = r["live"], r["sim"]
        cells = [f"{lv[k]:.{d}f} / {sm[k]:.{d}f} ({sm[k] / lv[k] - 1:+.0%})" for k, d in zip(KEYS, (1, 0, 0, 2))]
        print(f"| {r['variant']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
