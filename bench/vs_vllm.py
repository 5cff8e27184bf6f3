"""remp and vLLM's CPU build (the peer: ../shared/peers/vllm-cpu/README.md) side by side, fairly on a noisy
machine: both servers up at once (each idle while the other is measured), the same client for both (`remp bench
serve`; vLLM's own client dies with SIGILL on AVX2-only CPUs), one uncounted warm-up run each, then rounds
interleaved (A B, B A, A B, ...), medians.

    python bench/vs_vllm.py [--rounds 3] [--warmup 1] [--remp-args "--dtype float32"] [--vllm-args "--dtype float32"]
                            [--client-args "--max-concurrency 1 --num-prompts 8"] [--tag NAME]

Workload: 64 random prompts of 128 tokens, 64 output tokens, all at once (--client-args adds or overrides).
Both servers compute in float32 unless their args say otherwise (remp's `auto` would pick bf16 on a CPU with
native bf16, which is not the comparison of one engine with another); the result records both dtypes.
Prints startup (launch -> /health 200, each server started alone) and a table of medians with remp/vLLM
ratios; saves bench/results/vs_vllm-TAG.json.
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
from pathlib import Path

from remp.bench.results import save_result
from remp.tools.launch import LaunchedServer, remp_serve_command

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers" / "vllm-cpu"
PEER_DIR = Path(os.environ.get("PEER_DIR", Path(tempfile.gettempdir()) / "vllm-peer"))
CLIENT = "--dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 64 --request-rate inf"
KEYS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "duration")


def remp_server(port: int, args: str, log: Path) -> LaunchedServer:
    cmd = remp_serve_command("--served-model-name", "smollm2", "--port", str(port), *shlex.split(args))
    return LaunchedServer(cmd, url=f"http://127.0.0.1:{port}", log_path=log)


def vllm_server(port: int, args: str, log: Path) -> LaunchedServer:
    env_sh = PEERS / "env.sh"
    inner = (
        f". {shlex.quote(str(env_sh))} && cd {shlex.quote(str(PEER_DIR))} && exec python -m "
        f"vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} --model {PEER_DIR / 'smollm2-hf'} "
        f"--served-model-name smollm2 {args}"
    )
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"))
    # Ctrl-C to the whole group: vLLM's API server and its engine process
    return LaunchedServer(
        ["bash", "-c", inner], url=f"http://127.0.0.1:{port}", log_path=log, env=env, interrupt_group=True
    )


def run_client(port: int, extra: str, out: Path, workload: str = CLIENT, keys: tuple[str, ...] = KEYS) -> dict:
    """One `remp bench serve` run of `workload` + `extra` (later flags win) against the server on `port`: the
    result's `keys`. Seed 0 unless `extra` gives one."""
    tokenizer = ["--tokenizer", str(PEER_DIR / "smollm2-hf")]  # the same prompts for both servers
    cmd = [sys.executable, "-m", "remp", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}"]
    cmd += ["--model", "smollm2", *tokenizer, "--seed", "0", *shlex.split(workload), *shlex.split(extra)]
    cmd += ["--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(out.parent)]
    cmd += ["--result-filename", out.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = json.loads(out.read_text())
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} requests failed against port {port}: {r['errors'][:1]}")
    return {k: r[k] for k in keys}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs per server first (vLLM compiles lazily)")
    p.add_argument("--remp-args", default="--dtype float32")
    p.add_argument("--vllm-args", default="--dtype float32")
    p.add_argument("--client-args", default="")
    p.add_argument("--tag", default="tp1")
    a = p.parse_args()
    if not (PEER_DIR / "smollm2-hf").is_dir():
        sys.exit(f"the vLLM peer is not installed in {PEER_DIR}: see {PEERS / 'README.md'}")
    logs = Path(tempfile.mkdtemp(prefix="vs_vllm-"))
    ports = {"vllm": 8766, "remp": 8765}
    servers = {
        "vllm": vllm_server(ports["vllm"], a.vllm_args, logs / "vllm.log"),
        "remp": remp_server(ports["remp"], a.remp_args, logs / "remp.log"),
    }
    startup, runs = {}, {"vllm": [], "remp": []}
    try:
        for name, server in servers.items():  # one at a time: startup is measured alone
            startup[name] = round(server.start(timeout_s=900), 1)
            print(f"{name} healthy after {startup[name]} s (log {logs / (name + '.log')})", flush=True)
        for name in (n for n in servers for _ in range(a.warmup)):
            run_client(ports[name], a.client_args, logs / f"{name}-warmup.json")
        for r in range(a.rounds):
            order = ["vllm", "remp"] if r % 2 == 0 else ["remp", "vllm"]
            for name in order:
                out = logs / f"{name}-{r}.json"
                runs[name].append(run_client(ports[name], a.client_args, out))
                print(f"round {r} {name}: " + json.dumps(runs[name][-1]), flush=True)
    finally:
        for server in servers.values():
            server.stop(timeout_s=60)
    med = {n: {k: statistics.median(x[k] for x in rs) for k in KEYS} for n, rs in runs.items()}
    result = {
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
    dtypes = {n: dtype_of(args) for n, args in (("remp", a.remp_args), ("vLLM", a.vllm_args))}
    save_result(result, f"vs_vllm-{a.tag}", dtype=", ".join(f"{n} {d}" for n, d in dtypes.items()))


def dtype_of(args: str) -> str:
    """The --dtype among a server's flags ("auto" if none)."""
    words = shlex.split(args)
    for i, w in enumerate(words):
        if w == "--dtype" and i + 1 < len(words):
            return words[i + 1]
        if w.startswith("--dtype="):
            return w.split("=", 1)[1]
    return "auto"


if __name__ == "__main__":
    main()
