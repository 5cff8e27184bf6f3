"""Topology switches against the restart baseline, side by side in one run, with requests in flight.

    python bench/reconfig.py                      # default model (SmolLM2-135M), bf16, 4 workers
    python bench/reconfig.py --model random-1b    # a random ~1.1B Llama (TinyLlama shape) written as safetensors

For every ordered pair of topologies over 4 workers (TP4, TP2xPP2, PP4): the in-place switch (wall time, pause,
bytes moved per kind, minimum bytes, peak extra memory, time until every in-flight request has its next token)
next to the restart baseline (stop the workers, start new ones from the checkpoint, recompute the in-flight KV).
Also the measured point-to-point bandwidth between two worker processes, to compare the switch time with
bytes / bandwidth. Writes bench/results/reconfig-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from remp import LLMEngine, SamplingParams

TOPOLOGIES = [(4, 1), (2, 2), (1, 4)]
ONE_B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def _bw_worker(rank: int, port: int, nbytes: int, repeats: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, dst=1)
        else:
            dist.recv(buf, src=0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 1:
        out.put(nbytes / statistics.median(times))
    dist.destroy_process_group()


def p2p_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes/s of one gloo send between two worker processes on this machine (median)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_bw_worker, args=(r, port, nbytes, repeats, q)) for r in range(2)]
    for p in procs:
        p.start()
    bw = q.get(timeout=120)
    for p in procs:
        p.join(30)
    return bw


def fill(engine: LLMEngine, n: int, prompt_len: int, tag: str) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        ids = torch.randint(5, 250, (prompt_len,), generator=g).tolist()
        engine.add_request(
            f"{tag}{i}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
        )
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()


def measure(engine: LLMEngine, tp: int, pp: int, mode: str) -> dict:
    """Switch, then step until every in-flight request has its next token: resume_s is the whole interruption
    a streaming client sees (for a restart it includes recomputing the in-flight KV)."""
    target = {rid: r.num_output_tokens + 1 for rid, r in engine.requests.items()}
    t0 = time.perf_counter()
    report = engine.reconfigure(tp, pp, mode=mode)
    while any(engine.requests[rid].num_output_tokens < n for rid, n in target.items()):
        engine.step()
    d = report.to_dict()
    d["resume_s"] = time.perf_counter() - t0
    return d


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="path, or random-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    a = p.parse_args()

    tmp = None
    model, label = a.model, a.model or "smollm2-135m"
    if a.model == "random-1b":
        from remp.tools.random_model import write_random_llama

        tmp = tempfile.TemporaryDirectory(prefix="remp-1b-")
        t0 = time.perf_counter()
        model = str(write_random_llama(tmp.name, dtype=torch.bfloat16, **ONE_B))
        print(f"wrote random 1.1B Llama in {time.perf_counter() - t0:.1f} s")
        label = "random-1.1b"

    bw = p2p_bandwidth()
    print(f"p2p bandwidth: {bw / 1e9:.2f} GB/s")
    engine = LLMEngine(
        model=model,
        dtype=a.dtype,
        tensor_parallel_size=4,
        kv_cache_memory_gb=a.kv_cache_memory_gb,
        max_model_len=2048,
        worker_timeout_s=600,
    )
    fill(engine, a.requests, a.prompt_len, "warm")
    rows = []
    try:
        for src in TOPOLOGIES:
            for dst in TOPOLOGIES:
                if src == dst:
                    continue
                if (engine.topology.tp, engine.topology.pp) != src:
                    engine.reconfigure(*src)
                switch = measure(engine, *dst, "switch")
                engine.reconfigure(*src)
                restart = measure(engine, *dst, "restart")
                row = {
                    "from": f"TP{src[0]}xPP{src[1]}",
                    "to": f"TP{dst[0]}xPP{dst[1]}",
                    "switch": switch,
                    "restart": restart,
                    "speedup_wall": restart["wall_s"] / switch["wall_s"],
                    "speedup_resume": restart["resume_s"] / switch["resume_s"],
                    "bytes_over_bandwidth_s": sum(switch["bytes_moved"].values()) / bw,
                }
                rows.append(row)
                print(
                    json.dumps(
                        {
                            k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in row.items()
                            if k not in ("switch", "restart")
                        }
                    ),
                    flush=True,
                )
    finally:
        engine.shutdown()
        if tmp:
            tmp.cleanup()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores",
        "model": label,
        "dtype": a.dtype,
        "requests_in_flight": a.requests,
        "prompt_len": a.prompt_len,
        "p2p_bandwidth_Bps": bw,
        "pairs": rows,
    }
    out = Path(__file__).parent / "results" / f"reconfig-{label}.json"
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"saved {out}")


def table(result: dict) -> str:
    mb = lambda d: sum(d.values()) / 1e6
    lines = [
        f"{result['model']} ({result['dtype']}), {result['requests_in_flight']} requests in flight, "
        f"p2p {result['p2p_bandwidth_Bps'] / 1e9:.2f} GB/s",
        "",
        "| switch | wall ms | pause ms | resume ms | MB moved (w+kv) | min MB | bytes/bw ms | peak extra MB "
        "| restart wall s | restart resume s | speedup (wall) | speedup (resume) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["pairs"]:
        s, rs = r["switch"], r["restart"]
        lines.append(
            f"| {r['from']} -> {r['to']} | {s['wall_s'] * 1e3:.0f} | {s['pause_s'] * 1e3:.0f} | "
            f"{s['resume_s'] * 1e3:.0f} | {mb(s['bytes_moved']):.1f} ({s['bytes_moved']['weights'] / 1e6:.1f}"
            f"+{s['bytes_moved']['kv'] / 1e6:.1f}) | {mb(s['min_bytes']):.1f} | "
            f"{r['bytes_over_bandwidth_s'] * 1e3:.0f} | {s['peak_extra_bytes'] / 1e6:.1f} | "
            f"{rs['wall_s']:.1f} | {rs['resume_s']:.1f} | {r['speedup_wall']:.0f}x | "
            f"{r['speedup_resume']:.0f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
