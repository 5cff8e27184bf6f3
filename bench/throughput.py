"""Offline throughput and single-stream decode latency of remp on the default model (or --model).

    python bench/throughput.py [--dtype auto] [--num-prompts 64 --input-len 128 --output-len 64] [--hf-baseline]
    python bench/throughput.py --dtype float32,bfloat16   # dtypes side by side in one run
    python bench/throughput.py -tp 2 -pp 2          # one topology
    python bench/throughput.py --all-topologies     # TP1..4, PP2..4, TP2xPP2 in one run
    python bench/throughput.py --topologies TP1,TP2,TP1xPP2,TP2xPP2   # these in one run

Prints a summary and writes bench/results/throughput-<topology|all>-<dtype>.json. With --hf-baseline it also times
transformers' own generate() on the same model and prompt, in the same run and in the same dtype as remp's
(each dtype of --dtype, as `auto` resolved it), for a side-by-side ratio of single-stream decode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from remp import LLM, SamplingParams
from remp.bench.results import save_result
from remp.model.reader import open_checkpoint
from remp.topology import one_replica, parse_shape


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(100, vocab - 100, (length,), generator=g).tolist()} for _ in range(n)]


def single_stream(llm: LLM, prompt: dict, tokens: int, repeats: int) -> dict:
    """Per-token decode latency: (e2e - ttft) / (tokens - 1), median over repeats; and the driver<->worker
    control overhead per step (median), measured on these one-request steps."""
    engine = llm.llm_engine
    engine.stats.control_overhead_s.clear()
    tpots, ttfts = [], []
    for r in range(repeats):
        engine.add_request(f"s{r}", prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        first = None
        while engine.has_unfinished_requests():
            if engine.step() and first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        ttfts.append(first - t0)
        tpots.append((end - first) / (tokens - 1))
    return {
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "tpot_ms": statistics.median(tpots) * 1e3,
        "control_overhead_ms": statistics.median(engine.stats.control_overhead_s) * 1e3,
    }


def hf_single_stream(model_path, dtype: torch.dtype, prompt: dict, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from remp.model.reader import resolve_model_path

    path = resolve_model_path(model_path)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=dtype, **kw)
    ids = torch.tensor([prompt["prompt_token_ids"]])
    gen = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    with torch.inference_mode():
        gen(2)
        t0 = time.perf_counter()
        gen(1)
        t1 = time.perf_counter()
        gen(tokens)
        t2 = time.perf_counter()
    return {"tpot_ms": ((t2 - t1) - (t1 - t0)) / (tokens - 1) * 1e3}


def run_one(a: argparse.Namespace, tp: int, pp: int, dtype: str) -> dict:
    t0 = time.perf_counter()
    llm = LLM(a.model, dtype=dtype, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    load_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = random_prompts(a.num_prompts, a.input_len, vocab)
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    single = single_stream(llm, prompts[0], a.single_tokens, a.repeats)
    topo, resolved = str(llm.llm_engine.topology), str(llm.llm_engine.dtype).removeprefix("torch.")
    llm.shutdown()
    return {
        "topology": topo,
        "dtype": resolved,
        "dtype_asked": dtype,
        "load_s": round(load_s, 2),
        "batch": {
            "num_prompts": a.num_prompts,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(a.num_prompts / elapsed, 3),
            "output_tokens_per_s": round(out_tokens / elapsed, 1),
            "total_tokens_per_s": round((out_tokens + a.num_prompts * a.input_len) / elapsed, 1),
        },
        "single_stream": {k: round(v, 3) for k, v in single.items()},
    }


ALL_TOPOLOGIES = [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (1, 3), (1, 4), (2, 2)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto", help="one dtype, or several comma-separated to run side by side")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--single-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-baseline", action="store_true", help="transformers' single stream, in remp's dtype(s)")
    p.add_argument("--all-topologies", action="store_true", help="every TP x PP with tp*pp <= 4, one after another")
    p.add_argument("--topologies", default=None, help="these, one after another: e.g. TP1,TP2,TP1xPP2,TP2xPP2")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    topologies = ALL_TOPOLOGIES if a.all_topologies else [(a.tensor_parallel_size, a.pipeline_parallel_size)]
    if a.topologies:
        topologies = [one_replica(parse_shape(t)) for t in a.topologies.split(",")]
    runs = []
    for dtype in a.dtype.split(","):
        for tp, pp in topologies:
            runs.append(run_one(a, tp, pp, dtype))
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "model": a.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "runs": runs,
    }
    if a.hf_baseline:
        result["vs_transformers_single_stream"] = vs_transformers(a, runs[:: len(topologies)])
    print(json.dumps(result, indent=2))
    print(table(runs))
    for c in result.get("vs_transformers_single_stream", []):
        print(
            f"single stream in {c['dtype']}, both sides: remp {c['remp_tpot_ms']} ms/token, transformers "
            f"{c['transformers_tpot_ms']} ms/token: remp {c['remp_speedup']}x"
        )
    name = "all" if a.all_topologies else "-".join(r["topology"] for r in runs[: len(topologies)])
    dtypes = ",".join(dict.fromkeys(r["dtype"] for r in runs))
    save_result(result, f"throughput-{name}-{a.dtype.replace(',', '-')}", dtype=dtypes, path=a.out)


def vs_transformers(a: argparse.Namespace, firsts: list[dict]) -> list[dict]:
    """transformers' single-stream decode on the same prompt, in the dtype of each remp run given (the first
    topology's run of each dtype): the same arithmetic on both sides, so the ratio is one of engines."""
    vocab = open_checkpoint(a.model).config.vocab_size
    prompt = random_prompts(1, a.input_len, vocab)[0]
    out = []
    for run in firsts:
        hf = hf_single_stream(a.model, getattr(torch, run["dtype"]), prompt, a.single_tokens)
        remp_ms = run["single_stream"]["tpot_ms"]
        out.append(
            {
                "dtype": run["dtype"],
                "remp_topology": run["topology"],
                "remp_tpot_ms": remp_ms,
                "transformers_tpot_ms": round(hf["tpot_ms"], 2),
                "remp_speedup": round(hf["tpot_ms"] / remp_ms, 2),
            }
        )
    return out


def table(runs: list[dict]) -> str:
    rows = [
        "| topology | dtype | load s | req/s | output tok/s | single-stream ms/token | control overhead ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b, s = r["batch"], r["single_stream"]
        rows.append(
            f"| {r['topology']} | {r['dtype']}{' (auto)' if r['dtype_asked'] == 'auto' else ''} | {r['load_s']} | {b['requests_per_s']} | {b['output_tokens_per_s']} | "
            f"{s['tpot_ms']:.1f} | {s['control_overhead_ms']:.3f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
