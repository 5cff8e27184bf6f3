"""remp and vLLM's CPU build (the peer: ../shared/peers/vllm-cpu/README.md) side by side, fairly on a noisy
machine: both servers up at once (each idle while the other is measured), the same client for both (`remp bench
serve`; vLLM's own client dies with SIGILL on AVX2-only CPUs), one uncounted warm-up run each, then rounds
interleaved (A B, B A, A B, ...), medians.

    python bench/vs_vllm.py [--rounds 3] [--warmup 1] [--remp-args "..."] [--vllm-args "--dtype float32"]
                            [--client-args "--max-concurrency 1 --num-prompts 8"] [--tag NAME]

Workload: 64 random prompts of 128 tokens, 64 output tokens, all at once (--client-args adds or overrides).
Prints startup (launch -> /health 200, each server started alone) and a table of medians with remp/vLLM
ratios; saves bench/results/vs_vllm-TAG.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from remp.cpu_features import cpu_features

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers" / "vllm-cpu"
RESULTS = ROOT / "bench" / "results"
PEER_DIR = Path(os.environ.get("PEER_DIR", Path(tempfile.gettempdir()) / "vllm-peer"))
CLIENT = "--dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 64 --request-rate inf"
KEYS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "duration")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s")


def start_remp(port: int, args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "remp", "serve", "--served-model-name", "smollm2", "--port", str(port)]
    return subprocess.Popen(cmd + shlex.split(args), stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_vllm(port: int, args: str, log: Path) -> subprocess.Popen:
    env_sh = PEERS / "env.sh"
    inner = (
        f". {shlex.quote(str(env_sh))} && cd {shlex.quote(str(PEER_DIR))} && exec python -m "
        f"vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} --model {PEER_DIR / 'smollm2-hf'} "
        f"--served-model-name smollm2 {args}"
    )
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"))
    return subprocess.Popen(
        ["bash", "-c", inner], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def run_client(port: int, extra: str, out: Path) -> dict:
    tokenizer = ["--tokenizer", str(PEER_DIR / "smollm2-hf")]  # the same prompts for both servers
    cmd = [sys.executable, "-m", "remp", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}"]
    cmd += ["--model", "smollm2", *tokenizer, *shlex.split(CLIENT), *shlex.split(extra), "--ignore-eos"]
    cmd += ["--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", str(out.parent)]
    cmd += ["--result-filename", out.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = json.loads(out.read_text())
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} requests failed against port {port}")
    return {k: r[k] for k in KEYS}


def stop(proc: subprocess.Popen, group: bool) -> None:
    """Ctrl-C, then a kill after 60 s; `group`: the whole process group (vLLM's server and its engine)."""
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    if proc.poll() is None:
        send(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs per server first (vLLM compiles lazily)")
    p.add_argument("--remp-args", default="")
    p.add_argument("--vllm-args", default="--dtype float32")
    p.add_argument("--client-args", default="")
    p.add_argument("--tag", default="tp1")
    a = p.parse_args()
    if not (PEER_DIR / "smollm2-hf").is_dir():
        sys.exit(f"the vLLM peer is not installed in {PEER_DIR}: see {PEERS / 'README.md'}")
    logs = Path(tempfile.mkdtemp(prefix="vs_vllm-"))
    servers = {"vllm": (8766, start_vllm, a.vllm_args, True), "remp": (8765, start_remp, a.remp_args, False)}
    procs, startup, runs = {}, {}, {"vllm": [], "remp": []}
    try:
        for name, (port, start, args, _) in servers.items():  # one at a time: startup is measured alone
            procs[name] = start(port, args, logs / f"{name}.log")
            startup[name] = round(wait_healthy(f"http://127.0.0.1:{port}", procs[name]), 1)
            print(f"{name} healthy after {startup[name]} s (log {logs / (name + '.log')})", flush=True)
        for name in (n for n in servers for _ in range(a.warmup)):
            run_client(servers[name][0], a.client_args, logs / f"{name}-warmup.json")
        for r in range(a.rounds):
            order = ["vllm", "remp"] if r % 2 == 0 else ["remp", "vllm"]
            for name in order:
                out = logs / f"{name}-{r}.json"
                runs[name].append(run_client(servers[name][0], a.client_args, out))
                print(f"round {r} {name}: " + json.dumps(runs[name][-1]), flush=True)
    finally:
        for name, proc in procs.items():
            stop(proc, servers[name][3])
    med = {n: {k: statistics.median(x[k] for x in rs) for k in KEYS} for n, rs in runs.items()}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": cpu_features().describe(),
        "cores": os.cpu_count(),
        "workload": f"{CLIENT} {a.client_args}".strip(),
        "remp_args": a.remp_args,
        "vllm_args": a.vllm_args,
        "warmup_runs": a.warmup,
        "startup_s": startup,
        "runs": runs,
        "median": med,
        "remp_over_vllm_output_throughput": round(
            med["remp"]["output_throughput"] / med["vllm"]["output_throughput"], 3
        ),
    }
    print(f"| server | startup s | out tok/s (median of {a.rounds}) | mean TTFT ms | mean TPOT ms |")
    print("|---|---|---|---|---|")
    for n in ("vllm", "remp"):
        m = med[n]
        print(
            f"| {n} | {startup[n]} | {m['output_throughput']:.1f} | {m['mean_ttft_ms']:.0f} | {m['mean_tpot_ms']:.0f} |"
        )
    print(f"remp / vLLM output throughput: {result['remp_over_vllm_output_throughput']:.2f}x")
    out = RESULTS / f"vs_vllm-{a.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
