"""Offline throughput and single-stream decode latency of remp on the default model (or --model).

    python bench/throughput.py [--dtype bfloat16] [--num-prompts 64 --input-len 128 --output-len 64] [--hf-baseline]

Prints a summary and writes bench/results/throughput-<date>.json. With --hf-baseline it also times
transformers' own generate() on the same model and prompt, in the same run, for a side-by-side ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from remp import LLM, SamplingParams


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(100, vocab - 100, (length,), generator=g).tolist()} for _ in range(n)]


def single_stream(llm: LLM, prompt: dict, tokens: int, repeats: int) -> dict:
    """Per-token decode latency: (e2e - ttft) / (tokens - 1), median over repeats."""
    engine = llm.llm_engine
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
    return {"ttft_ms": statistics.median(ttfts) * 1e3, "tpot_ms": statistics.median(tpots) * 1e3}


def hf_single_stream(model_path, dtype: torch.dtype, prompt: dict, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    from remp.model.reader import resolve_model_path
    path = resolve_model_path(model_path)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=dtype, **kw)
    ids = torch.tensor([prompt["prompt_token_ids"]])
    gen = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    with torch.inference_mode():
        gen(2)
        t0 = time.perf_counter(); gen(1); t1 = time.perf_counter(); gen(tokens); t2 = time.perf_counter()
    return {"tpot_ms": ((t2 - t1) - (t1 - t0)) / (tokens - 1) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--single-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-baseline", action="store_true")
    p.add_argument("--hf-dtype", default="float32", help="transformers computes GGUF weights fastest in float32")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    t0 = time.perf_counter()
    llm = LLM(a.model, dtype=a.dtype, tensor_parallel_size=a.tensor_parallel_size,
              pipeline_parallel_size=a.pipeline_parallel_size)
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
    topo = llm.llm_engine.topology if hasattr(llm.llm_engine, "topology") else None
    llm.shutdown()
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.node()} {torch.get_num_threads()} threads",
        "model": a.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)", "dtype": a.dtype,
        "topology": str(topo) if topo else f"TP{a.tensor_parallel_size}xPP{a.pipeline_parallel_size}",
        "load_s": round(load_s, 2),
        "batch": {"num_prompts": a.num_prompts, "input_len": a.input_len, "output_len": a.output_len,
                  "elapsed_s": round(elapsed, 3), "requests_per_s": round(a.num_prompts / elapsed, 3),
                  "output_tokens_per_s": round(out_tokens / elapsed, 1),
                  "total_tokens_per_s": round((out_tokens + a.num_prompts * a.input_len) / elapsed, 1)},
        "single_stream": {k: round(v, 2) for k, v in single.items()},
    }
    if a.hf_baseline:
        hf = hf_single_stream(a.model, getattr(torch, a.hf_dtype), prompts[0], a.single_tokens)
        result["transformers_single_stream"] = {"dtype": a.hf_dtype, **{k: round(v, 2) for k, v in hf.items()}}
        result["single_stream_speedup_vs_transformers"] = round(hf["tpot_ms"] / single["tpot_ms"], 2)
    print(json.dumps(result, indent=2))
    out = Path(a.out or Path(__file__).parent / "results" / f"throughput-{result['topology']}-{a.dtype}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
