"""A worker's memory by kind (remp/memory.py): fresh at several topologies, and after many switches under load.

    python bench/worker_memory.py fresh [--models smollm2-fp32,smollm2-bf16,random-1b] [--topologies TP1,TP2,TP2xPP2]
    python bench/worker_memory.py switches [--switches 20] [--seed 0] [--dtype float32]

fresh: per model and topology, an engine (worker processes, as `remp serve` runs them; 1 GiB of KV in all)
serves a few requests, then each worker's heartbeat gives its memory by kind: canonical weights, execution
copies (packed linears, RoPE tables), KV, switch staging, runtime (what the process held before its shard,
libraries and mapped files, shared memory), unaccounted (RSS minus the rest). Writes
bench/results/worker-memory-fresh.json.

switches: SmolLM2 starts at TP2 with --max-workers 4 and makes --switches random switches (live or stop, over
every DP x TP x PP shape of up to 4 workers, the pool growing and shrinking) with requests in flight all along,
the last one to TP1; then the remaining worker's RSS is compared with a fresh TP1 worker's, measured in the same
run. RSS is read from /proc/PID/status, so this part also runs on code without the memory account (for a
before/after: PYTHONPATH=<older checkout> ... --out FILE); the kinds come from the switch reports when present.
Writes bench/results/worker-memory-switches.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from reconfig import ONE_B  # the 1.1B shapes every bench uses

from remp import LLMEngine, SamplingParams
from remp.bench.results import describe_machine, save_result

MODELS = {  # name -> (model, dtype); random-1b is written when asked for
    "smollm2-fp32": (None, "float32"),
    "smollm2-bf16": (None, "bfloat16"),
    "random-1b": ("random-1b", "bfloat16"),
}
SHAPES = [(1, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1), (1, 1, 2), (1, 2, 2), (1, 1, 4), (2, 1, 1), (2, 2, 1)]
MB = 1e6


def parse_topology(s: str) -> tuple[int, int, int]:
    """ "TP2xPP2" or "DP2xTP2" -> (dp, tp, pp)."""
    dims = {"DP": 1, "TP": 1, "PP": 1}
    for part in s.upper().split("X"):
        dims[part[:2]] = int(part[2:])
    return dims["DP"], dims["TP"], dims["PP"]


def name(dp: int, tp: int, pp: int) -> str:
    return (f"DP{dp}x" if dp > 1 else "") + f"TP{tp}xPP{pp}"


def proc_rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def add_requests(engine: LLMEngine, n: int, rng: random.Random, tag: str, max_tokens: int) -> None:
    for i in range(n):
        ids = [rng.randrange(5, 250) for _ in range(rng.randrange(64, 256))]
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)


def workers(engine: LLMEngine) -> list[dict]:
    """Each worker's RSS (from /proc) and, where the code reports it, its memory by kind (from a heartbeat
    sent after this call)."""
    time.sleep(1.2)  # heartbeats come every 0.5 s
    executor = engine.executor
    executor.poll()
    memory = executor.worker_memory() if hasattr(executor, "worker_memory") else [None] * len(executor.procs)
    return [
        {"rank": r, "proc": proc_rss(p.pid), "memory": m.to_dict() if m is not None else None}
        for r, (p, m) in enumerate(zip(executor.procs, memory))
    ]


def fresh(model: str | None, dtype: str, topology: str, kv_gb: float) -> list[dict]:
    dp, tp, pp = parse_topology(topology)
    engine = LLMEngine(
        model=model,
        dtype=dtype,
        data_parallel_size=dp,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        distributed_executor_backend="mp",
        kv_cache_memory_gb=kv_gb,
        max_model_len=2048,
        worker_timeout_s=600,
    )
    try:
        add_requests(engine, 8, random.Random(0), "warm", 16)
        while engine.has_unfinished_requests():
            engine.step()
        return workers(engine)
    finally:
        engine.shutdown()


def run_fresh(a: argparse.Namespace, random_1b: str | None) -> dict:
    rows = []
    for key in a.models.split(","):
        model, dtype = MODELS[key]
        for topology in a.topologies.split(","):
            ws = fresh(random_1b if model == "random-1b" else model, dtype, topology, a.kv_cache_memory_gb)
            rows.append({"model": key, "dtype": dtype, "topology": topology, "workers": ws})
            print(json.dumps({"model": key, "topology": topology, "rss_mb": [w["proc"]["VmRSS"] / MB for w in ws]}))
    return {"kv_cache_memory_gb": a.kv_cache_memory_gb, "runs": rows}


def run_switches(a: argparse.Namespace) -> dict:
    rng = random.Random(a.seed)
    baseline = fresh(None, a.dtype, "TP1", a.kv_cache_memory_gb)[0]
    engine = LLMEngine(
        dtype=a.dtype,
        tensor_parallel_size=2,
        max_workers=4,
        distributed_executor_backend="mp",
        kv_cache_memory_gb=a.kv_cache_memory_gb,
        max_model_len=2048,
        worker_timeout_s=600,
    )
    steps, history, batch = 0, [], 0
    try:
        start = workers(engine)
        current = (1, 2, 1)
        for i in range(a.switches):
            avoid = {current, (1, 1, 1)} if i == a.switches - 2 else {current}  # the last one goes to TP1
            target = (1, 1, 1) if i == a.switches - 1 else rng.choice([s for s in SHAPES if s not in avoid])
            mode = rng.choice(["live", "live", "stop"])
            if engine.get_num_unfinished_requests() < a.requests:  # requests in flight all along
                add_requests(engine, a.requests - engine.get_num_unfinished_requests(), rng, f"b{batch}", 200)
                batch += 1
            for _ in range(4):
                engine.step()
                steps += 1
            dp, tp, pp = target
            report = engine.reconfigure(tp, pp, mode=mode, data_parallel_size=dp)
            current = target
            after = workers(engine)
            history.append(
                {
                    "to": name(*target),
                    "mode": mode,
                    "pause_s": report.pause_s,
                    "wall_s": report.wall_s,
                    "give_back_s": report.worker_seconds.get("give_back"),
                    "rss_after": [w["proc"]["VmRSS"] for w in after],
                    "memory_after": getattr(report, "memory_after", None),
                }
            )
            print(
                f"{i + 1:2d}. {mode:4s} -> {name(*target):10s} pause {report.pause_s * 1e3:5.0f} ms, "
                f"RSS MB {[round(w['proc']['VmRSS'] / MB) for w in after]}",
                flush=True,
            )
        for _ in range(8):
            engine.step()
        end = workers(engine)
    finally:
        engine.shutdown()
    rss, fresh_rss = end[0]["proc"]["VmRSS"], baseline["proc"]["VmRSS"]
    print(f"after {a.switches} switches: TP1 worker RSS {rss / MB:.0f} MB, fresh TP1 {fresh_rss / MB:.0f} MB "
          f"({rss / fresh_rss - 1:+.1%})")  # fmt: skip
    return {
        "switches": a.switches,
        "seed": a.seed,
        "requests_in_flight": a.requests,
        "kv_cache_memory_gb": a.kv_cache_memory_gb,
        "fresh_tp1": baseline,
        "start": start,
        "history": history,
        "end": end,
        "rss_vs_fresh": rss / fresh_rss - 1,
    }


def table(result: dict) -> str:
    """Per model and topology, each worker's memory by kind in MB (the kinds sum to its RSS)."""
    kinds = ("weights", "execution", "kv", "staging", "runtime", "unaccounted")
    lines = [
        f"{describe_machine(result['machine'])}, KV {result['kv_cache_memory_gb']:g} GiB in all",
        "",
        "| model | topology | worker | RSS | " + " | ".join(kinds) + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for run in result["runs"]:
        for w in run["workers"]:
            m = w["memory"] or {}
            cells = " | ".join(f"{m[k] / MB:.0f}" if k in m else "-" for k in kinds)
            lines.append(
                f"| {run['model']} | {run['topology']} | {w['rank']} | {w['proc']['VmRSS'] / MB:.0f} | {cells} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=["fresh", "switches"])
    p.add_argument("--models", default="smollm2-fp32,smollm2-bf16,random-1b")
    p.add_argument("--topologies", default="TP1,TP2,TP2xPP2")
    p.add_argument("--switches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="switches: SmolLM2's dtype")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--out", default=None, help="where to write the result (default bench/results/)")
    p.add_argument("--table", metavar="JSON", help="print the table of a saved fresh result and exit")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    if a.part == "switches":
        save_result(run_switches(a), "worker-memory-switches", dtype=a.dtype, path=a.out)
        return
    tmp, random_1b = None, None
    if "random-1b" in a.models.split(","):
        from remp.tools.random_model import write_random_llama

        tmp = tempfile.TemporaryDirectory(prefix="remp-1b-")
        random_1b = str(write_random_llama(tmp.name, dtype=torch.bfloat16, **ONE_B))
    try:
        result = run_fresh(a, random_1b)
    finally:
        if tmp is not None:
            tmp.cleanup()
    path = save_result(result, "worker-memory-fresh", dtype=None, path=a.out)
    print(table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
