"""Recovery from a lost worker against the restart a user needs today, side by side in one run.

    python bench/recovery.py                      # default model (SmolLM2-135M), TP4
    python bench/recovery.py --model random-1b    # a random ~1.1B Llama (TinyLlama shape)

For each worker to kill (default ranks 1 and 3: on SmolLM2's 3 KV heads over TP4, rank 1's KV head is also on
rank 0 and survives, rank 3's is on no other worker and must be recomputed): start a TP4 engine, 16 requests
decoding, SIGKILL the worker and step on. Recovery: from the kill until every request has its next token.
Restart baseline (what a user does today): start a new engine on the topology the recovery chose, re-send
every request (prompt + tokens so far) and step until each has its next token; the process start, the
checkpoint load and the KV recompute are all in it. Both produce the same next tokens (checked). Writes
bench/results/recovery-<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time

import torch
from reconfig import ONE_B, fill

from remp import LLMEngine, SamplingParams
from remp.bench.results import save_result


def next_tokens(engine: LLMEngine, ids: list[str], t0: float) -> tuple[dict[str, int], float]:
    """Step until every request in `ids` has one more token; its token and the time from t0 until the last."""
    first: dict[str, int] = {}
    while len(first) < len(ids):
        for o in engine.step():
            if o.request_id in ids and o.request_id not in first:
                first[o.request_id] = o.outputs[0].token_ids[-1]
    return first, time.perf_counter() - t0


def scenario(model: str, dtype: str, rank: int, requests: int, prompt_len: int) -> dict:
    engine = LLMEngine(model=model, dtype=dtype, tensor_parallel_size=4, max_model_len=2048, worker_timeout_s=600)
    try:
        fill(engine, requests, prompt_len, "r")
        steps = []
        for _ in range(16):
            t = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t)
        ids = [r.request_id for r in engine.scheduler.running]
        sofar = {r.request_id: list(r.token_ids) for r in engine.scheduler.running}
        t0 = time.perf_counter()
        os.kill(engine.executor.procs[rank].pid, signal.SIGKILL)
        recovered, recovery_s = next_tokens(engine, ids, t0)
        report = next(r for r in engine.stats.switches if r.cause == "worker_lost")
        topology, dtype = engine.topology, str(engine.dtype).removeprefix("torch.")
    finally:
        engine.shutdown()
    t0 = time.perf_counter()
    fresh = LLMEngine(
        model=model,
        dtype=dtype,
        tensor_parallel_size=topology.tp,
        pipeline_parallel_size=topology.pp,
        max_model_len=2048,
        worker_timeout_s=600,
    )
    try:
        start_s = time.perf_counter() - t0
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for rid, toks in sofar.items():
            fresh.add_request(rid, {"prompt_token_ids": toks}, params)
        restarted, restart_s = next_tokens(fresh, ids, t0)
    finally:
        fresh.shutdown()
    return {
        "killed_rank": rank,
        "dtype": dtype,
        "recovered_onto": str(topology),
        "median_step_s": statistics.median(steps),
        "recovery_s": recovery_s,
        "recovery_switch_s": report.wall_s,
        "kv_recomputed": bool(report.preempted),
        "recomputed_tokens": report.recomputed_tokens,
        "bytes_from_checkpoint": report.bytes_from_checkpoint,
        "bytes_moved": report.bytes_moved,
        "restart_s": restart_s,
        "restart_engine_start_s": start_s,
        "speedup": restart_s / recovery_s,
        "same_next_tokens": recovered == restarted,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="path, or random-1b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kill", type=int, nargs="+", default=[1, 3], help="ranks of TP4 to kill, one run each")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    a = p.parse_args()
    tmp, model, label = None, a.model, a.model or "smollm2-135m"
    if a.model == "random-1b":
        from remp.tools.random_model import write_random_llama

        tmp = tempfile.TemporaryDirectory(prefix="remp-1b-")
        model, label = str(write_random_llama(tmp.name, dtype=torch.bfloat16, **ONE_B)), "random-1.1b"
    try:
        rows = []
        for rank in a.kill:
            rows.append(scenario(model, a.dtype, rank, a.requests, a.prompt_len))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if tmp:
            tmp.cleanup()
    result = {
        "model": label,
        "requests_in_flight": a.requests,
        "prompt_len": a.prompt_len,
        "runs": rows,
    }
    save_result(result, f"recovery-{label}", dtype=",".join(dict.fromkeys(r["dtype"] for r in rows)))
    print("| killed | onto | KV recomputed | recovery | restart | restart / recovery | same next tokens |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| rank {r['killed_rank']} | {r['recovered_onto']} | {r['recomputed_tokens']} tokens | "
            f"{r['recovery_s']:.2f} s | {r['restart_s']:.2f} s | {r['speedup']:.1f}x | {r['same_next_tokens']} |"
        )


if __name__ == "__main__":
    main()
