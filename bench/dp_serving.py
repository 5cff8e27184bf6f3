"""Data-parallel replicas (issue 25) on 2 workers: serving throughput of DP2xTP1 against TP2 (and PP2 for
context), then live switches DP2xTP1 <-> TP2 under load, their pause and bytes beside the planner's minimum and
beside what the planner's plan costs at the bandwidth this machine measured.

    python bench/dp_serving.py [--rounds 3] [--dtype bfloat16] [--client-args "--num-prompts 128"] [--tag T]
                               [--skip-compare] [--skip-switch]

Throughput: the three servers up at once (each idle while another is measured), the same client (`remp bench
serve`, bench/vs_vllm.py's workload: 64 random prompts of 128 tokens, 64 output tokens, all at once), one
uncounted warm-up run each, rounds interleaved, medians.

Switches: `remp serve -tp 2` under a steady load (--switch-load) switches TP2 -> DP2xTP1 -> TP2 live
(--live-pairs times), then once each way stop-the-world; each switch's SwitchReport (from /admin/reconfigure).
The bandwidth is what the policy's measured profile uses (remp/policy/measured.py): bytes moved / pause of the
stop-the-world switches. The prediction prices the plan the engine makes (remp/planner/plan.py: best_placement,
kv_routes, make_plan on the DP topologies, with the KV blocks the switch moved) as the switch cost model prices a
(tp, pp) switch (remp/policy/switch_cost.py with measured.py's CPU overheads): the slowest receiver's weights and
KV over the bandwidth; live: pre-copy = (weights + the KV written before the pause) / the pre-copy duty, pause =
cut-over + the KV dirty at the cut-over (the model's default: 1 block in 16).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from vs_vllm import CLIENT, PEER_DIR, remp_server, run_client

from remp.bench.results import save_result
from remp.config import ModelConfig
from remp.engine_args import EngineArgs
from remp.model.reader import open_checkpoint
from remp.planner.mode import LIVE, STOP, Moves, Overheads
from remp.planner.plan import KVPiece, PieceSizer, best_placement, kv_routes, make_plan
from remp.policy.measured import CPU_CUTOVER_S, CPU_PRECOPY_SLOWDOWN
from remp.topology import Topology

SHAPES = {"DP2xTP1": "-dp 2 -tp 1", "TP2": "-tp 2", "PP2": "-pp 2"}
KEYS = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "duration")
ADMIN_TOKEN = "bench"
SWITCH_LOAD = "--random-input-len 128 --random-output-len 256 --num-prompts 100000 --max-concurrency 32"


def compare(a: argparse.Namespace, logs: Path) -> dict:
    base = f"--dtype {a.dtype} --kv-cache-memory-gb {a.kv_cache_gb:g} {a.remp_args}"
    ports = {name: 8770 + i for i, name in enumerate(SHAPES)}
    servers = {n: remp_server(ports[n], f"{base} {flags}", logs / f"{n}.log") for n, flags in SHAPES.items()}
    startup: dict[str, float] = {}
    runs: dict[str, list[dict]] = {n: [] for n in servers}
    try:
        for name, server in servers.items():
            startup[name] = round(server.start(timeout_s=900), 1)
            print(f"{name} healthy after {startup[name]} s (log {server.log_path})", flush=True)
        for name in servers:
            run_client(ports[name], a.client_args, logs / f"{name}-warmup.json", CLIENT, KEYS)
        for k in range(a.rounds):
            for name in list(servers) if k % 2 == 0 else list(servers)[::-1]:
                runs[name].append(run_client(ports[name], a.client_args, logs / f"{name}-{k}.json", CLIENT, KEYS))
                print(f"round {k} {name}: " + json.dumps(runs[name][-1]), flush=True)
    finally:
        for server in servers.values():
            server.stop(timeout_s=60)
    med = {n: {k: statistics.median(x[k] for x in rs) for k in KEYS} for n, rs in runs.items()}
    return {"workload": f"{CLIENT} {a.client_args}".strip(), "startup_s": startup, "runs": runs, "median": med}


def compare_table(c: dict) -> str:
    med = c["median"]
    lines = [
        "| shape (2 workers) | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | vs TP2 | startup s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, m in med.items():
        lines.append(
            f"| {n} | {m['output_throughput']:.1f} | {m['request_throughput']:.2f} | {m['median_ttft_ms']:.0f} "
            f"| {m['p99_ttft_ms']:.0f} | {m['median_tpot_ms']:.0f} "
            f"| {m['output_throughput'] / med['TP2']['output_throughput']:.2f}x | {c['startup_s'][n]} |"
        )
    return "\n".join(lines)


# --- live switches under load --------------------------------------------------------------------------------


def _post(url: str, path: str, body: dict | None = None, timeout: float = 600) -> dict:
    req = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def switches(a: argparse.Namespace, logs: Path) -> list[dict]:
    port = 8773
    flags = f"--dtype {a.dtype} --kv-cache-memory-gb {a.kv_cache_gb:g} -tp 2 --admin-token {ADMIN_TOKEN}"
    server = remp_server(port, f"{flags} {a.remp_args}", logs / "switch.log")
    plan = [("live", (1, 1, 2)), ("live", (2, 1, 1))] * a.live_pairs + [("stop", (1, 1, 2)), ("stop", (2, 1, 1))]
    out: list[dict] = []
    client = None
    try:
        server.start(timeout_s=900)
        cmd = [sys.executable, "-m", "remp", "bench", "serve", "--base-url", server.url, "--model", "smollm2"]
        cmd += ["--tokenizer", str(PEER_DIR / "smollm2-hf"), "--dataset-name", "random", *shlex.split(a.switch_load)]
        cmd += ["--ignore-eos", "--disable-tqdm"]
        client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(a.settle_s)
        for mode, (tp, pp, dp) in plan:
            before = _post(server.url, "/admin/topology")
            body = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "data_parallel_size": dp, "mode": mode}
            t0 = time.time()
            report = _post(server.url, "/admin/reconfigure", body)
            row = {"request_s": round(time.time() - t0, 3), "replicas_before": before["replicas"], "report": report}
            out.append(row)
            print(
                f"{report['mode']} {report['old_topology']} -> {report['new_topology']}: pause "
                f"{report['pause_s'] * 1e3:.0f} ms, pre-copy {report['precopy_s'] * 1e3:.0f} ms, moved "
                f"{report['bytes_moved']} (min {report['min_bytes']}), KV blocks {report['kv_blocks_moved']}",
                flush=True,
            )
            if client.poll() is not None:
                raise RuntimeError(f"the load stopped ({client.returncode}) before the switches were done")
            time.sleep(a.settle_s)
    finally:
        if client is not None and client.poll() is None:
            client.terminate()
            client.wait(60)
        server.stop(timeout_s=60)
    return out


def predicted(config: ModelConfig, itemsize: int, block_size: int, bw: float, duty: float, report: dict) -> dict:
    """What the planner's plan for this switch costs at `bw` (bytes/s), priced as SwitchCostModel prices one."""
    old, new = (parse_topology(report[k]) for k in ("old_topology", "new_topology"))
    blocks = report["kv_blocks_moved"]
    sizer = PieceSizer(config, itemsize, blocks, block_size)
    placed = best_placement(config, old, new.tp, new.pp, sizer, with_kv=True, workers=[0, 1], dp=new.dp)
    routes = kv_routes(config, old, placed)
    per_old = -(-blocks // old.dp)  # the old replicas' blocks, taken as even
    sizer = sizer.with_blocks({(s, d): -(-per_old // len(ds)) for s, ds in routes.items() for d in ds})
    plan = make_plan(config, old, placed, sizer, with_kv=True)
    weights: dict[int, int] = {}
    kv: dict[int, int] = {}
    for t in plan.transfers:
        into = kv if isinstance(t.piece, KVPiece) else weights
        into[t.dst] = into.get(t.dst, 0) + sizer.bytes(t.piece)
    w, k = max(weights.values(), default=0), max(kv.values(), default=0)
    moves = Moves(w / bw, k / bw / max(blocks, 1), plan.moved.weights, plan.moved.kv // max(blocks, 1))
    mode = LIVE if report["mode"] == "live" else STOP
    cost = mode.price(moves, blocks, None, Overheads(CPU_CUTOVER_S, 0.0, duty, CPU_PRECOPY_SLOWDOWN))
    return {
        "bytes_moved": {"weights": plan.moved.weights, "kv": plan.moved.kv},
        "min_bytes": {"weights": plan.minimum.weights, "kv": plan.minimum.kv},
        "slowest_receiver_bytes": {"weights": w, "kv": k},
        "pause_s": cost.pause_s,
        "precopy_s": cost.precopy_s,
    }


def parse_topology(name: str) -> Topology:
    """ "DP2xTP1xPP1" or "TP2xPP1" (a report's topology names) -> Topology."""
    dp, rest = (int(name[2 : name.index("x")]), name[name.index("x") + 1 :]) if name.startswith("DP") else (1, name)
    tp, pp = (int(x) for x in rest[2:].split("xPP"))
    return Topology(tp, pp, dp=dp)


def switch_table(rows: list[dict], bw: float) -> str:
    def mb(d: dict) -> float:
        return sum(d.values()) / 1e6

    lines = [
        f"bandwidth (stop-the-world bytes / pause): {bw / 1e6:.0f} MB/s",
        "",
        "| switch | mode | KV blocks | pause ms (planner) | pre-copy ms (planner) | wall ms | MB moved (planner; min) "
        "| KV MB in pause | tok/s before -> during |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r, p = row["report"], row["predicted"]
        lines.append(
            f"| {r['old_topology']} -> {r['new_topology']} | {r['mode']} | {r['kv_blocks_moved']} "
            f"| {r['pause_s'] * 1e3:.0f} ({p['pause_s'] * 1e3:.0f}) | {r['precopy_s'] * 1e3:.0f} "
            f"({p['precopy_s'] * 1e3:.0f}) | {r['wall_s'] * 1e3:.0f} | {mb(r['bytes_moved']):.1f} "
            f"({mb(p['bytes_moved']):.1f}; {mb(r['min_bytes']):.1f}) | {r['bytes_moved_in_pause']['kv'] / 1e6:.1f} "
            f"| {r['tokens_per_s_before']} -> {r['tokens_per_s_during']} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--remp-args", default="")
    p.add_argument("--client-args", default="", help="added to the throughput workload (later flags win)")
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--skip-switch", action="store_true")
    p.add_argument("--switch-load", default=SWITCH_LOAD, help="the load during the switches (random dataset)")
    p.add_argument("--live-pairs", type=int, default=2, help="live TP2 -> DP2 -> TP2 round trips")
    p.add_argument("--settle-s", type=float, default=10.0, help="serving before the first switch and between")
    p.add_argument("--tag", default="smollm2")
    a = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="dp_serving-"))
    result: dict = {"remp_args": a.remp_args, "kv_cache_gib": a.kv_cache_gb, "logs": str(logs)}
    if not a.skip_compare:
        result["compare"] = compare(a, logs)
        print(compare_table(result["compare"]), flush=True)
    if not a.skip_switch:
        rows = switches(a, logs)
        stops = [r["report"] for r in rows if r["report"]["mode"] == "stop"]
        bw = sum(sum(r["bytes_moved"].values()) for r in stops) / sum(r["pause_s"] for r in stops)
        config = open_checkpoint(None).config
        itemsize = getattr(torch, a.dtype).itemsize
        duty = EngineArgs().switch_precopy_duty  # as the server ran (unless --remp-args changed it)
        for row in rows:
            row["predicted"] = predicted(config, itemsize, 16, bw, duty, row["report"])
        result |= {"switch_load": a.switch_load, "bandwidth_Bps": bw, "switches": rows}
        print(switch_table(rows, bw), flush=True)
    save_result(result, f"dp_serving-{a.tag}", dtype=a.dtype)


if __name__ == "__main__":
    main()
