"""Live and stop-the-world switches against the restart baseline, side by side in one run, with requests in flight.

    python bench/reconfig.py [--dtype auto]       # default model (SmolLM2-135M), 4 workers
    python bench/reconfig.py --model random-1b    # a random ~1.1B Llama (TinyLlama shape) written as safetensors

For every ordered pair of topologies over 4 workers (TP4, TP2xPP2, PP4), each mode in turn: wall time, pause
(the cut-over alone), pre-copy time, bytes moved before and in the pause beside the minimum, peak extra memory,
serving throughput during pre-copy against before it, and the interruption: the longest time any in-flight
request went without a token during the switch (for a restart: until it resumed, its KV recomputed). Also the
median decode step before each switch and the measured point-to-point bandwidth, so the pause can be compared
with a step plus the pause's bytes / bandwidth. Writes bench/results/reconfig-<model>.json, prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from remp import LLMEngine, SamplingParams
from remp.bench.results import describe_machine, save_result

TOPOLOGIES = [(4, 1), (2, 2), (1, 4)]
MODES = ("live", "stop", "restart")
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


def median_step_s(engine: LLMEngine, steps: int = 32) -> float:
    """Steps as usual (after a previous switch: decode again, not recompute), timed; also the window the
    switch report's `tokens_per_s_before` covers."""
    # after a restart the requests recompute their KV first: those steps are not the decode rate
    while engine.scheduler.waiting or any(r.num_uncomputed_tokens > 1 for r in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(engine: LLMEngine, tp: int, pp: int, mode: str) -> dict:
    """Switch while stepping; the interruption is the longest time an in-flight request went without a token,
    from the last step before the switch until each has had one after it."""
    step_s = median_step_s(engine)
    done: dict = {}
    t_last = engine.step_log.last_step_time()
    last_token = {rid: t_last for rid in engine.requests}
    gap = {rid: 0.0 for rid in engine.requests}
    t0 = time.perf_counter()
    engine.start_reconfigure(tp, pp, mode=mode, on_done=lambda r, e: done.update(r=r, e=e, t=time.perf_counter()))
    resumed: set[str] = set()
    while not done or resumed != set(last_token):
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in last_token:
                gap[o.request_id] = max(gap[o.request_id], now - last_token[o.request_id])
                last_token[o.request_id] = now
                if done:
                    resumed.add(o.request_id)
    if done["e"] is not None:
        raise done["e"]
    d = done["r"].to_dict()
    d.update(interruption_s=max(gap.values()), median_step_s=step_s, done_s=done["t"] - t0)
    return d


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="path, or random-1b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--table", metavar="JSON", help="print the tables of a saved result and exit")
    a = p.parse_args()
    if a.table:
        result = json.loads(Path(a.table).read_text())
        print(table(result) + "\n\n" + pause_shares(result))
        return

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
                row = {"from": f"TP{src[0]}xPP{src[1]}", "to": f"TP{dst[0]}xPP{dst[1]}"}
                for mode in MODES:
                    if (engine.topology.tp, engine.topology.pp) != src:
                        engine.reconfigure(*src, mode="stop")
                    row[mode] = measure(engine, *dst, mode)
                row["bytes_over_bandwidth_s"] = sum(row["live"]["bytes_moved"].values()) / bw
                row["pause_kv_over_bandwidth_s"] = row["live"]["bytes_moved_in_pause"]["kv"] / bw
                rows.append(row)
                print(json.dumps(summary(row)), flush=True)
    finally:
        engine.shutdown()
        if tmp:
            tmp.cleanup()
    dtype = str(engine.dtype).removeprefix("torch.")
    result = {
        "model": label,
        "requests_in_flight": a.requests,
        "prompt_len": a.prompt_len,
        "p2p_bandwidth_Bps": bw,
        "pairs": rows,
    }
    path = save_result(result, f"reconfig-{label}", dtype=dtype)
    print(table(json.loads(path.read_text())) + "\n\n" + pause_shares(result))


def summary(row: dict) -> dict:
    ms = lambda x: round(x * 1e3, 1)
    out = {"pair": f"{row['from']} -> {row['to']}"}
    for mode in MODES:
        r = row[mode]
        out[mode] = {
            "wall_ms": ms(r["wall_s"]),
            "pause_ms": ms(r["pause_s"]),
            "interruption_ms": ms(r["interruption_s"]),
        }
    return out


def table(result: dict) -> str:
    mb = lambda x: x / 1e6
    lines = [
        f"{result['model']} ({result['dtype']}), {result['requests_in_flight']} requests in flight, "
        f"p2p {result['p2p_bandwidth_Bps'] / 1e9:.2f} GB/s, {describe_machine(result['machine'])}",
        "",
        "| switch | median step ms | live: pre-copy ms / pause ms / interruption ms | pause KV MB (KV/bw ms) "
        "| tok/s before -> during | stop: pause ms / interruption ms | MB moved (min) | bytes/bw ms "
        "| restart: interruption ms | live vs restart |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["pairs"]:
        lv, st, rs = r["live"], r["stop"], r["restart"]
        moved, least = sum(lv["bytes_moved"].values()), sum(lv["min_bytes"].values())
        lines.append(
            f"| {r['from']} -> {r['to']} | {lv['median_step_s'] * 1e3:.0f} "
            f"| {lv['precopy_s'] * 1e3:.0f} / {lv['pause_s'] * 1e3:.0f} / {lv['interruption_s'] * 1e3:.0f}"
            f"{' (stop: staging over budget)' if lv.get('fallback') else ''} "
            f"| {mb(lv['bytes_moved_in_pause']['kv']):.1f} ({r['pause_kv_over_bandwidth_s'] * 1e3:.0f}) "
            f"| {lv['tokens_per_s_before']} -> {lv['tokens_per_s_during']} "
            f"| {st['pause_s'] * 1e3:.0f} / {st['interruption_s'] * 1e3:.0f} | {mb(moved):.1f} ({mb(least):.1f}) "
            f"| {r['bytes_over_bandwidth_s'] * 1e3:.0f} | {rs['interruption_s'] * 1e3:.0f} "
            f"| {rs['interruption_s'] / lv['interruption_s']:.0f}x |"
        )
    return "\n".join(lines)


def pause_shares(result: dict) -> str:
    """Where each live pause went. Each phase is the slowest worker's time in it; workers run them side by side,
    so shares can add up past 100%. "other" is what no worker phase covers: the driver's drain, block-table
    swap and synchronisation."""
    lines = ["| live switch | pause ms | KV transfer | KV assemble | install | other |", "|---|---|---|---|---|---|"]
    for r in result["pairs"]:
        lv = r["live"]
        ws, pause = lv["worker_seconds"], lv["pause_s"]
        if lv.get("fallback"):
            lines.append(f"| {r['from']} -> {r['to']} | {pause * 1e3:.0f} | ran stop-the-world: {lv['fallback']} ||||")
            continue
        parts = [ws.get(k, 0.0) for k in ("kv_transfer", "kv_assemble", "install")]
        shares = [f"{x / pause:.0%}" for x in [*parts, max(pause - sum(parts), 0.0)]]
        lines.append(f"| {r['from']} -> {r['to']} | {pause * 1e3:.0f} | " + " | ".join(shares) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
