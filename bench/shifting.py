"""A phased workload (calm long chats -> burst of short requests -> long prompts) served four ways, one after
another on the same machine: each fixed topology; remp switching topology at phase boundaries; and
restart-based switching at the same moments (stop the server, start it with the new flags, clients retry),
which is what a vLLM user does today. One table: throughput, goodput, p99 TTFT, failed and retried requests.

    python bench/shifting.py [--model PATH] [--schedule TP1xPP4,TP4xPP1,TP2xPP2] [--fixed TP1xPP4,TP4xPP1,TP2xPP2]
                             [--phase-seconds 20] [--goodput ttft:3000 tpot:300]

Saves bench/results/shifting.json and timeline PNGs next to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from remp.bench.results import save_result
from remp.tools.launch import LaunchedServer, remp_serve_command
from remp.topology import one_replica, parse_shape

RESULTS = Path(__file__).parent / "results"


def phases(seconds: float) -> list[dict]:
    return [
        {"name": "calm long chats", "duration_s": seconds, "request_rate": 0.5, "input_len": 64, "output_len": 96},
        {
            "name": "burst of short requests",
            "duration_s": seconds,
            "request_rate": 6.0,
            "input_len": 32,
            "output_len": 16,
        },
        {"name": "long prompts", "duration_s": seconds, "request_rate": 1.0, "input_len": 384, "output_len": 32},
    ]


class Server:
    """`remp serve` on a fixed port (clients retry against it across restarts), restarted with new flags."""

    def __init__(self, model: str | None, dtype: str, port: int, log: Path):
        self.model, self.dtype, self.log = model, dtype, log
        self.url = f"http://127.0.0.1:{port}"
        self.launched: LaunchedServer | None = None

    def start(self, tp: int, pp: int, extra: tuple[str, ...] = ()) -> float:
        """Starts it; returns the seconds until /health answered 200."""
        cmd = remp_serve_command(
            *([self.model] if self.model else []),
            "--dtype",
            self.dtype,
            "-tp",
            str(tp),
            "-pp",
            str(pp),
            "--port",
            self.url.rsplit(":", 1)[1],
            "--admin-token",
            "bench",
            "--served-model-name",
            "m",
            "--max-model-len",
            "2048",
            *extra,
        )
        self.launched = LaunchedServer(cmd, url=self.url, log_path=self.log)
        return self.launched.start(timeout_s=900)

    def stop(self) -> None:
        if self.launched is not None:
            self.launched.stop()
            self.launched = None

    def state(self) -> dict:
        """GET /admin/topology: the topology, its switches and the policy's state (decisions, calibration)."""
        req = urllib.request.Request(self.url + "/admin/topology", headers={"authorization": "Bearer bench"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def switch(self, tp: int, pp: int) -> dict:
        req = urllib.request.Request(
            self.url + "/admin/reconfigure",
            method="POST",
            data=json.dumps({"tensor_parallel_size": tp, "pipeline_parallel_size": pp}).encode(),
            headers={"content-type": "application/json", "authorization": "Bearer bench"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())


def run_variant(name: str, server: Server, schedule: list[tuple[int, int]], mode: str, a, out_dir: Path) -> dict:
    """mode: fixed (schedule has one entry), switch or restart (one topology per phase), or policy (the server
    picks its topology: --topology-policy auto among the fixed ones, from a profile)."""
    extra = ()
    if mode == "policy":
        extra = (
            "--topology-policy",
            "auto",
            "--max-workers",
            "4",
            "--candidates",
            a.fixed,
            "--perf-profile",
            a.policy_profile,
            "--policy-interval-s",
            "2",
            "--policy-min-dwell-s",
            str(a.phase_seconds / 2),
            "--policy-window-s",
            str(a.phase_seconds / 2),
            "--slo-ttft-ms",
            a.goodput[0].split(":")[1],
            "--slo-tpot-ms",
            a.goodput[1].split(":")[1],
        )
    server.start(*schedule[0], extra)
    result_file = out_dir / f"shifting-{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "remp",
        "bench",
        "serve",
        "--base-url",
        server.url,
        "--model",
        "m",
        "--phases",
        json.dumps(phases(a.phase_seconds)),
        "--random-vocab-size",
        str(a.vocab),
        "--ignore-eos",
        "--retry-failed",
        "1000",
        "--goodput",
        *a.goodput,
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        result_file.name,
        "--disable-tqdm",
        "--seed",
        "0",
        "--timeline",
        str(out_dir / f"shifting-{name}.png"),
    ]
    if mode in ("switch", "policy"):
        cmd += ["--poll-topology", "--admin-token", "bench"]
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = []
    try:
        t0 = time.perf_counter()
        for i, topo in enumerate(schedule[1:], start=1):
            time.sleep(max(0.0, t0 + i * a.phase_seconds - time.perf_counter()))
            t = time.perf_counter() - t0
            if mode == "switch":
                rep = server.switch(*topo)
                events.append({"at_s": t, "to": f"TP{topo[0]}xPP{topo[1]}", "pause_s": rep["pause_s"]})
            elif mode == "restart":
                server.stop()
                startup = server.start(*topo)
                events.append({"at_s": t, "to": f"TP{topo[0]}xPP{topo[1]}", "downtime_s": startup})
        out, _ = bench.communicate(timeout=3600)
        policy_state = server.state().get("policy") if mode == "policy" else None
    finally:
        if bench.poll() is None:
            bench.kill()
        server.stop()
    r = json.loads(result_file.read_text())
    extra_out = {}
    if mode == "policy":
        events = (r.get("topology") or {}).get("switches", [])
        extra_out["policy"] = policy_state
    return extra_out | {
        "variant": name,
        "events": events,
        "completed": r["completed"],
        "failed": r["failed"],
        "retried_requests": r.get("retried_requests", 0),
        "request_throughput": r["request_throughput"],
        "output_throughput": r["output_throughput"],
        "request_goodput": r.get("request_goodput"),
        "p99_ttft_ms": r["p99_ttft_ms"],
        "median_ttft_ms": r["median_ttft_ms"],
        "median_tpot_ms": r["median_tpot_ms"],
        "duration_s": r["duration"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--schedule", default="TP1xPP4,TP4xPP1,TP2xPP2", help="topology per phase (remp and restart)")
    p.add_argument("--fixed", default="TP1xPP4,TP4xPP1,TP2xPP2", help="fixed topologies to compare")
    p.add_argument("--phase-seconds", type=float, default=20.0)
    p.add_argument("--goodput", nargs="+", default=["ttft:3000", "tpot:300"])
    p.add_argument("--vocab", type=int, default=32000, help="random prompt token ids below this")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--variants", default="fixed,switch,restart,policy")
    p.add_argument("--policy-profile", default=None, help="`remp profile` of the fixed topologies (for policy)")
    a = p.parse_args()
    variants = a.variants.split(",")
    if "policy" in variants and not a.policy_profile:
        raise SystemExit("the policy variant needs --policy-profile (make one: remp profile -tp 4 --candidates ...)")
    schedule = [one_replica(parse_shape(s)) for s in a.schedule.split(",")]
    RESULTS.mkdir(exist_ok=True)
    server = Server(a.model, a.dtype, a.port, Path(tempfile.mkdtemp(prefix="shifting-")) / "server.log")
    print(f"server log: {server.log}", flush=True)
    rows = []
    for topo in a.fixed.split(",") if "fixed" in variants else []:
        rows.append(run_variant(f"fixed-{topo}", server, [one_replica(parse_shape(topo))], "fixed", a, RESULTS))
        print(json.dumps(rows[-1]), flush=True)
    for mode in ("switch", "restart"):
        if mode in variants:
            rows.append(run_variant(f"{mode}-{a.schedule.replace(',', '-')}", server, schedule, mode, a, RESULTS))
            print(json.dumps(rows[-1]), flush=True)
    if "policy" in variants:
        start = max(one_replica(parse_shape(t)) for t in a.fixed.split(","))
        rows.append(run_variant("policy-auto", server, [start], "policy", a, RESULTS))
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "model": a.model or "smollm2-135m",
        "phases": phases(a.phase_seconds),
        "schedule": a.schedule,
        "goodput_slo": a.goodput,
        "variants": rows,
    }
    save_result(out, "shifting", dtype=a.dtype)
    print(
        "| variant | completed | failed | retried | req/s | out tok/s | goodput req/s | p99 TTFT ms | "
        "median TPOT ms |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['variant']} | {r['completed']} | {r['failed']} | {r['retried_requests']} | "
            f"{r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {r['request_goodput'] or 0:.2f} | "
            f"{r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
