"""The CUDA path, checked on one GPU in a few minutes; writes what it finds as JSON and prints a summary.

    python bench/gpu_check.py [--gguf PATH] [--out DIR]

1. The default model (SmolLM2 GGUF) in float32 on CUDA, in this process and in a worker process, against the
   CPU: greedy tokens must be equal.
2. A random Llama with 7B-shaped layers (4 of them) in float32 on CUDA against the CPU: greedy tokens and the
   chosen tokens' logprobs within rounding.
3. Decode and prefill step times of that model in bfloat16 by batch size and context length: the simulator's
   calibration data (per step of 4 layers; the LM head is timed apart so a per-layer figure can be derived).
4. NCCL between two processes on the one GPU: a weight-sized transfer, if NCCL allows two ranks on one device.
5. remp with 2 workers on the one GPU (TP2, then a live switch to PP2), if (4) worked.

Each check is independent: one that fails is recorded with its error and the others still run. Without a GPU
it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from remp.bench.results import save_result

SEVEN_B_LAYERS = dict(  # Llama-2-7B's layer shape; 4 layers keep the CPU reference quick
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three prime numbers:",
]


def greedy(llm, prompts, max_tokens: int = 32) -> list[tuple[list[int], list[float]]]:
    from remp import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True))
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
    return result


def compare(ref, got) -> dict:
    """Per prompt: tokens equal, first divergence, and the largest logprob difference before it."""
    rows = []
    for (rt, rl), (gt, gl) in zip(ref, got):
        n = next((i for i, (a, b) in enumerate(zip(rt, gt)) if a != b), len(rt))
        rows.append(
            {
                "tokens_equal": rt == gt,
                "first_divergence": None if rt == gt else n,
                "max_logprob_diff": max((abs(a - b) for a, b in zip(rl[:n], gl[:n])), default=0.0),
            }
        )
    return {
        "all_tokens_equal": all(r["tokens_equal"] for r in rows),
        "max_logprob_diff": max(r["max_logprob_diff"] for r in rows),
        "prompts": rows,
    }


def run_llm(model: str, prompts, **kwargs):
    from remp import LLM

    t0 = time.perf_counter()
    with LLM(model, **kwargs) as llm:
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = greedy(llm, prompts)
        return out, {"start_s": round(start, 2), "generate_s": round(time.perf_counter() - t1, 2)}


def check_default_model(gguf: str | None) -> dict:
    if gguf is None or not Path(gguf).exists():
        return {"skipped": f"no GGUF file at {gguf}"}
    cpu, cpu_t = run_llm(gguf, PROMPTS, dtype="float32", device="cpu")
    gpu, gpu_t = run_llm(gguf, PROMPTS, dtype="float32", device="cuda")
    gpu_mp, gpu_mp_t = run_llm(gguf, PROMPTS, dtype="float32", device="cuda", distributed_executor_backend="mp")
    return {
        "cuda_vs_cpu": compare(cpu, gpu),
        "cuda_worker_process_vs_cpu": compare(cpu, gpu_mp),
        "times": {"cpu": cpu_t, "cuda": gpu_t, "cuda_worker_process": gpu_mp_t},
        "ok": compare(cpu, gpu)["all_tokens_equal"] and compare(cpu, gpu_mp)["all_tokens_equal"],
    }


def check_random_7b(model: str) -> dict:
    ids = [[(17 * i + 31 * j) % 32000 for j in range(24)] for i in range(len(PROMPTS))]
    prompts = [{"prompt_token_ids": p} for p in ids]
    cpu, cpu_t = run_llm(model, prompts, dtype="float32", device="cpu")
    gpu, gpu_t = run_llm(model, prompts, dtype="float32", device="cuda")
    cmp = compare(cpu, gpu)
    return {**cmp, "times": {"cpu": cpu_t, "cuda": gpu_t}, "ok": cmp["max_logprob_diff"] < 1e-2}


def _median_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


@torch.inference_mode()
def step_timings(model: str) -> dict:
    """Forward passes of the whole shard (embed, 4 layers, LM head on sampled rows) on CUDA in bfloat16."""
    from remp.model.attention import SeqChunk, build_metadata
    from remp.model.reader import open_checkpoint
    from remp.model_runner import ModelRunner
    from remp.topology import Topology

    reader = open_checkpoint(model)
    cfg, block = reader.config, 16
    batches, contexts, prefills = (1, 8, 32, 64, 128), (128, 512, 2048), (128, 512, 2048, 4096)
    num_blocks = max(batches) * max(contexts) // block + 8
    runner = ModelRunner(
        reader, Topology(1, 1).spec(cfg, 0), torch.bfloat16, num_blocks, block, 4096 + block, device="cuda"
    )
    dev = runner.device

    def forward(chunks):
        meta = build_metadata(chunks, block, runner.model.q_per_kv).to(dev)
        ids = torch.tensor([t for c in chunks for t in c.token_ids], device=dev)
        hidden = runner.model.forward(runner.model.embed(ids), meta, runner.kv)
        return runner.model.logits(hidden[meta.logits_rows])

    decode = []
    for ctx in contexts:
        per_seq = (ctx + block) // block
        for b in batches:
            if b * per_seq > num_blocks:
                continue
            chunks = [SeqChunk([7], ctx, list(range(i * per_seq, (i + 1) * per_seq)), True) for i in range(b)]
            t_meta = time.perf_counter()
            build_metadata(chunks, block, runner.model.q_per_kv)
            meta_ms = (time.perf_counter() - t_meta) * 1e3
            decode.append(
                {
                    "batch": b,
                    "context": ctx,
                    "step_ms": _median_ms(lambda c=chunks: forward(c)),
                    "metadata_cpu_ms": round(meta_ms, 3),
                }
            )
    prefill = []
    for n in prefills:
        chunks = [SeqChunk([7] * n, 0, list(range((n + block - 1) // block)), True)]
        prefill.append({"tokens": n, "step_ms": _median_ms(lambda c=chunks: forward(c))})
    h = torch.randn(max(batches), cfg.hidden_size, dtype=torch.bfloat16, device=dev)
    lm_head = [{"rows": b, "ms": _median_ms(lambda b=b: runner.model.logits(h[:b]))} for b in batches]
    return {
        "dtype": "bfloat16",
        "layers": cfg.num_hidden_layers,
        "shape": SEVEN_B_LAYERS,
        "block_size": block,
        "decode": decode,
        "prefill": prefill,
        "lm_head": lm_head,
    }


def _nccl_peer(rank: int, port: int, nbytes: int, out) -> None:
    import torch.distributed as dist

    try:
        torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=datetime.timedelta(seconds=60),
            device_id=torch.device("cuda", 0),
        )
        buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        times = []
        for _ in range(6):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, dst=1)
            else:
                dist.recv(buf, src=0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if rank == 1:
            out.put({"ok": True, "bytes": nbytes, "GBps": round(nbytes / statistics.median(times[1:]) / 1e9, 2)})
        dist.destroy_process_group()
    except Exception as e:
        out.put({"ok": False, "rank": rank, "error": f"{type(e).__name__}: {e}"[:600]})


def nccl_one_gpu(nbytes: int = 512 << 20) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_nccl_peer, args=(r, port, nbytes, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = q.get(timeout=120)
    except Exception:
        result = {"ok": False, "error": "no answer from the two NCCL processes in 120 s"}
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return result


def remp_two_workers(model: str) -> dict:
    """TP2 on the one GPU against TP1, then a live switch to PP2 with requests in flight."""
    from remp import LLMEngine, SamplingParams

    ids = [[(13 * i + 7 * j) % 32000 for j in range(24)] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def tokens(engine, switch_after: int | None = None):
        rids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in ids]
        done, steps, report = {}, 0, None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            if steps == switch_after:
                report = engine.reconfigure(1, 2)
        return [done[r] for r in rids], report

    common = dict(model=model, dtype="float32", device="cuda", distributed_executor_backend="mp")
    one = LLMEngine(**common)
    try:
        ref, _ = tokens(one)
    finally:
        one.shutdown()
    two = LLMEngine(tensor_parallel_size=2, **common)
    try:
        tp2, _ = tokens(two)
        switched, report = tokens(two, switch_after=6)
    finally:
        two.shutdown()
    return {
        "tp2_equals_tp1": tp2 == ref,
        "live_switch_tp2_to_pp2_equals_tp1": switched == ref,
        "switch": {"pause_ms": round(report.pause_s * 1e3, 1), "wall_ms": round(report.wall_s * 1e3, 1)},
        "ok": tp2 == ref and switched == ref,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="the default model's file (default: the installed one)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: skipped, no CUDA device visible to torch", flush=True)
        return
    from remp.model.reader import default_model_path
    from remp.tools.random_model import write_random_llama

    try:
        gguf = a.gguf or str(default_model_path())
    except FileNotFoundError:
        gguf = None
    report: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
    }
    print(json.dumps(report), flush=True)
    tmp = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    model = str(write_random_llama(tmp.name, dtype=torch.bfloat16, **SEVEN_B_LAYERS))
    print(f"wrote the random 7B-layer model in {time.perf_counter() - t0:.1f} s", flush=True)
    checks = [
        ("default_model_fp32", lambda: check_default_model(gguf)),
        ("random_7b_layers_fp32", lambda: check_random_7b(model)),
        ("step_timings_bf16", lambda: step_timings(model)),
        ("nccl_two_processes_one_gpu", nccl_one_gpu),
    ]
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
        report[name]["check_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(report[name]), flush=True)
    if report["nccl_two_processes_one_gpu"].get("ok"):
        try:
            report["remp_two_workers_one_gpu"] = remp_two_workers(model)
        except Exception:
            report["remp_two_workers_one_gpu"] = {"ok": False, "error": traceback.format_exc()[-2000:]}
    else:
        report["remp_two_workers_one_gpu"] = {"skipped": "NCCL cannot put two ranks on the one GPU (check 4)"}
    print("remp_two_workers_one_gpu", json.dumps(report["remp_two_workers_one_gpu"]), flush=True)
    dtypes = "float32 (checks 1, 2, 5), bfloat16 (3, 4)"
    save_result(report, "gpu_check", dtype=dtypes, path=Path(a.out) / "gpu_check.json")
    sys.exit(0)


if __name__ == "__main__":
    main()
