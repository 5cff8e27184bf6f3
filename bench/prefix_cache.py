"""Prefix caching (issue 27) on a multi-turn chat behind one shared system prompt (`remp bench serve
--dataset-name prefix-chat`): remp with its prefix cache, remp without it, and vLLM's CPU build with its own
(vLLM V1: on by default), as bench/vs_vllm.py runs them: all three servers up at once (each idle while another
is measured), the same client, one uncounted warm-up run each (one turn of the chats), rounds interleaved,
medians. Each round draws new prompts (seed = round + 1, the same for every server), so no round finds the
previous one's chats cached; each run's hit rate comes from the server's own counters (/metrics) before and
after it.

Then (--switch-to) the cache across a live switch: remp with 2 workers (-tp 2) serves a longer run of the same
workload and switches (POST /admin/reconfigure) while it runs; the hit rate before the switch, after it, and in
the first seconds after it, beside a control run with no switch over the same windows.

    python bench/prefix_cache.py [--rounds 3] [--dtype bfloat16] [--client-args "--num-prompts 192"] [--tag T]
                                 [--switch-to 1,2,1 --switch-to 1,1,2 --switch-at-s 40] [--skip-compare]

--switch-to TP,PP,DP (repeatable): a switch from TP2 to that shape, each in a run of its own.
Saves bench/results/prefix_cache-TAG.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from vs_vllm import PEER_DIR, PEERS, remp_server, run_client, vllm_server

from remp.bench.results import save_result

WORKLOAD = (
    "--dataset-name prefix-chat --prefix-chat-system-len 1000 --prefix-chat-users 64 --num-prompts 192 "
    "--random-input-len 64 --random-output-len 32 --request-rate inf"
)
KEYS = (
    "output_throughput",
    "request_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_ttft_ms",
    "median_tpot_ms",
    "duration",
    "total_input_tokens",
    "start_time",
)
COUNTERS = {
    "remp": ("remp:prefix_cache_queries_total", "remp:prefix_cache_hits_total"),
    "vllm": ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
}
ADMIN_TOKEN = "bench"


def prefix_counters(url: str, kind: str, required: bool = True) -> tuple[float, float]:
    """(prompt tokens looked up, prompt tokens found) in the server's prefix cache so far, from its /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return parse_counters(r.read().decode(), COUNTERS[kind], required)


def parse_counters(text: str, names: tuple[str, str], required: bool = True) -> tuple[float, float]:
    """The two counters `names` in a Prometheus text, each summed over its labels (remp's replicas). Not
    `required`: absent counters read 0 (remp's labelled counters appear with the first request)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{", 1)[0].split(" ", 1)[0], line.rsplit(" ", 1)[1]
            if name in names:
                sums[name] = sums.get(name, 0.0) + float(value)
    if (missing := [n for n in names if n not in sums]) and required:
        raise RuntimeError(f"no {missing} in /metrics")
    return sums.get(names[0], 0.0), sums.get(names[1], 0.0)


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    queries, hits = after[0] - before[0], after[1] - before[1]
    return round(hits / queries, 4) if queries else None


# --- remp with and without its cache, and vLLM ---------------------------------------------------------------


def compare(a: argparse.Namespace, logs: Path) -> dict:
    kv = f"--dtype {a.dtype} --kv-cache-memory-gb {a.kv_cache_gb:g}"
    servers = {
        "vllm": (vllm_server(8766, f"--dtype {a.dtype} {a.vllm_args}", logs / "vllm.log"), "vllm"),
        "remp": (remp_server(8765, f"{kv} {a.remp_args}", logs / "remp.log"), "remp"),
        "remp-no-cache": (
            remp_server(8767, f"{kv} --no-enable-prefix-caching {a.remp_args}", logs / "remp-no-cache.log"),
            "remp",
        ),
    }
    ports = {"vllm": 8766, "remp": 8765, "remp-no-cache": 8767}
    startup: dict[str, float] = {}
    runs: dict[str, list[dict]] = {n: [] for n in servers}

    def run(name: str, seed: int, out: Path, extra: str = "") -> dict:
        server, kind = servers[name]
        c0 = prefix_counters(server.url, kind, required=False)
        r = run_client(ports[name], f"{a.client_args} --seed {seed} {extra}", out, WORKLOAD, KEYS)
        r["hit_rate"] = hit_rate(c0, prefix_counters(server.url, kind))
        return r

    try:
        for name, (server, _) in servers.items():  # one at a time: startup is measured alone
            startup[name] = round(server.start(timeout_s=900), 1)
            print(f"{name} healthy after {startup[name]} s (log {server.log_path})", flush=True)
        for name in servers:
            r = run(name, 1000, logs / f"{name}-warmup.json", "--num-prompts 64")  # one turn: warm, not long
            print(f"warm-up {name}: " + json.dumps(r), flush=True)
        for k in range(a.rounds):
            order = list(servers) if k % 2 == 0 else list(servers)[::-1]
            for name in order:
                runs[name].append(run(name, k + 1, logs / f"{name}-{k}.json"))
                print(f"round {k} {name}: " + json.dumps(runs[name][-1]), flush=True)
    finally:
        for server, _ in servers.values():
            server.stop(timeout_s=60)
    keys = [k for k in KEYS if k != "start_time"] + ["hit_rate"]
    med = {n: {k: _median([x[k] for x in rs]) for k in keys} for n, rs in runs.items()}
    return {"startup_s": startup, "runs": runs, "median": med}


def _median(xs: list) -> float | None:
    """None where every run had none (a hit rate without a cache)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def compare_table(c: dict) -> str:
    med = c["median"]
    lines = [
        "| server | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | hit rate | startup s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, m in med.items():
        lines.append(
            f"| {n} | {m['output_throughput']:.1f} | {m['request_throughput']:.2f} | {m['median_ttft_ms']:.0f} "
            f"| {m['p99_ttft_ms']:.0f} | {m['median_tpot_ms']:.0f} | {'-' if m['hit_rate'] is None else format(m['hit_rate'], '.1%')} | {c['startup_s'][n]} |"
        )
    v, r, nc = med["vllm"], med["remp"], med["remp-no-cache"]
    lines.append(
        f"\nremp / vLLM: out tok/s {r['output_throughput'] / v['output_throughput']:.2f}x, TTFT p50 "
        f"{v['median_ttft_ms'] / r['median_ttft_ms']:.2f}x, p99 {v['p99_ttft_ms'] / r['p99_ttft_ms']:.2f}x "
        f"(>1: remp better); remp cache / no cache: out tok/s {r['output_throughput'] / nc['output_throughput']:.2f}x, "
        f"TTFT p50 {nc['median_ttft_ms'] / r['median_ttft_ms']:.2f}x"
    )
    return "\n".join(lines)


# --- the cache across a live switch -----------------------------------------------------------------------------


def switch_run(a: argparse.Namespace, target: tuple[int, int, int] | None, logs: Path, tag: str) -> dict:
    """remp -tp 2 under a long prefix-chat run; with `target`, a live switch to it `switch_at_s` into the run.
    Returns the counters sampled every 0.5 s (seconds from the client's start) and the switch's report."""
    port = 8768
    args = f"--dtype {a.dtype} --kv-cache-memory-gb {a.kv_cache_gb:g} -tp 2 --admin-token {ADMIN_TOKEN} {a.remp_args}"
    server = remp_server(port, args, logs / f"switch-{tag}.log")
    out = logs / f"switch-{tag}.json"
    samples: list[tuple[float, float, float]] = []
    switch: dict = {}
    try:
        server.start(timeout_s=900)
        run_client(port, f"{a.client_args} --num-prompts 64 --seed 1000", logs / f"switch-{tag}-warmup.json", WORKLOAD)
        cmd = [sys.executable, "-m", "remp", "bench", "serve", "--base-url", server.url, "--model", "smollm2"]
        cmd += ["--tokenizer", str(PEER_DIR / "smollm2-hf"), *shlex.split(WORKLOAD), *shlex.split(a.client_args)]
        cmd += ["--num-prompts", str(64 * a.switch_turns), "--seed", "1", "--ignore-eos", "--disable-tqdm"]
        cmd += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
        t0 = time.time()
        client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        thread = None
        while True:
            done = client.poll() is not None
            samples.append((time.time(), *prefix_counters(server.url, "remp", required=done)))
            if done:
                break
            if target and thread is None and time.time() - t0 >= a.switch_at_s:
                thread = threading.Thread(target=_reconfigure, args=(server.url, target, switch), daemon=True)
                switch["requested"] = time.time()
                thread.start()
            time.sleep(0.5)
        if client.returncode:
            raise RuntimeError(f"the client failed ({client.returncode}): {out}")
        if thread is not None:
            thread.join(timeout=600)
            if "report" not in switch:
                raise RuntimeError(f"the switch failed: {switch.get('error')}")
    finally:
        server.stop(timeout_s=60)
    r = json.loads(out.read_text())
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} requests failed: {r['errors'][:1]}")

    def shift(t: float) -> float:  # seconds from the client's start
        return round(t - r["start_time"], 3)

    return {
        "target": target,
        "samples": [(shift(t), q, h) for t, q, h in samples],
        "requested_s": shift(switch["requested"]) if switch else None,
        "done_s": shift(switch["done"]) if switch else None,
        "report": switch.get("report"),
        "duration": r["duration"],
        "output_throughput": r["output_throughput"],
        "median_ttft_ms": r["median_ttft_ms"],
        "p99_ttft_ms": r["p99_ttft_ms"],
    }


def _reconfigure(url: str, target: tuple[int, int, int], into: dict) -> None:
    tp, pp, dp = target
    body = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "data_parallel_size": dp, "mode": "live"}
    req = urllib.request.Request(
        url + "/admin/reconfigure",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            into["report"] = json.loads(r.read())
    except Exception as e:  # reported by the caller
        into["error"] = f"{type(e).__name__}: {e}"
    into["done"] = time.time()


def window_rate(samples: list, lo: float, hi: float) -> float | None:
    """Hit rate between the last sample at or before `lo` and the first at or after `hi` (seconds)."""
    first = max((s for s in samples if s[0] <= lo), key=lambda s: s[0], default=samples[0])
    last = min((s for s in samples if s[0] >= hi), key=lambda s: s[0], default=samples[-1])
    return hit_rate(first[1:], last[1:])


def switch_rates(run: dict, requested: float, done: float, after_s: float) -> dict:
    s, end = run["samples"], run["samples"][-1][0]
    return {
        "before": window_rate(s, 0.0, requested),
        "during": window_rate(s, requested, done),
        "after": window_rate(s, done, end),
        f"first_{after_s:g}s_after": window_rate(s, done, done + after_s),
        "whole_run": window_rate(s, 0.0, end),
    }


def switch_table(switches: list[dict], control: dict, after_s: float) -> str:
    lines = [
        f"| switch | requested / done s | pause ms | hit rate before | during | after | first {after_s:g} s after "
        "| whole run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sw in switches:
        rep = sw["report"]
        for name, run in ((f"{rep['old_topology']} -> {rep['new_topology']}", sw), ("control (no switch)", control)):
            r = switch_rates(run, sw["requested_s"], sw["done_s"], after_s)
            pause = f"{rep['pause_s'] * 1e3:.0f}" if run is sw else "-"
            lines.append(
                f"| {name} | {sw['requested_s']:.1f} / {sw['done_s']:.1f} | {pause} | "
                + " | ".join("-" if r[k] is None else f"{r[k]:.1%}" for k in r)
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="for all servers")
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache of each server (vLLM: GiB, as remp)")
    p.add_argument("--remp-args", default="")
    p.add_argument("--vllm-args", default="")
    p.add_argument("--client-args", default="", help="added to the workload (later flags win)")
    p.add_argument("--skip-compare", action="store_true", help="only the switch runs")
    p.add_argument("--switch-to", action="append", default=[], metavar="TP,PP,DP", help="a live switch from TP2")
    p.add_argument("--switch-at-s", type=float, default=40.0, help="into the run")
    p.add_argument("--switch-turns", type=int, default=6, help="turns of each user in a switch run")
    p.add_argument("--after-s", type=float, default=15.0, help="the window just after the switch")
    p.add_argument("--tag", default="smollm2")
    a = p.parse_args()
    if not a.skip_compare and not (PEER_DIR / "smollm2-hf").is_dir():
        sys.exit(f"the vLLM peer is not installed in {PEER_DIR}: see {PEERS / 'README.md'}")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{a.kv_cache_gb:g}"  # env.sh keeps a value set here
    logs = Path(tempfile.mkdtemp(prefix="prefix_cache-"))
    result: dict = {"workload": f"{WORKLOAD} {a.client_args}".strip(), "remp_args": a.remp_args}
    result |= {"vllm_args": a.vllm_args, "kv_cache_gib": a.kv_cache_gb, "logs": str(logs)}
    if not a.skip_compare:
        result["compare"] = compare(a, logs)
        print(compare_table(result["compare"]), flush=True)
    if a.switch_to:
        targets = [tuple(int(x) for x in t.split(",")) for t in a.switch_to]
        result["switch_workload"] = f"{WORKLOAD} {a.client_args} --num-prompts {64 * a.switch_turns}"
        result["control"] = switch_run(a, None, logs, "control")
        result["switches"] = [switch_run(a, t, logs, "-".join(map(str, t))) for t in targets]
        for sw in result["switches"]:
            sw["rates"] = switch_rates(sw, sw["requested_s"], sw["done_s"], a.after_s)
            sw["control_rates"] = switch_rates(result["control"], sw["requested_s"], sw["done_s"], a.after_s)
        print(switch_table(result["switches"], result["control"], a.after_s), flush=True)
    save_result(result, f"prefix_cache-{a.tag}", dtype=a.dtype)


if __name__ == "__main__":
    main()
