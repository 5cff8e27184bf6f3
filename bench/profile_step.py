"""Where one engine step's time goes: the torch profiler over the prefill and the decode steps of the serving
workload (64 prompts of 128 tokens, 64 output tokens), TP1 in-process, grouped into matmuls, attention,
elementwise ops, sampling, and what no op accounts for (Python, scheduling, metadata).

    python bench/profile_step.py [--dtype auto] [--num-prompts 64 --input-len 128 --output-len 64]

Prints one table per phase and saves bench/results/profile-step-<dtype>.json.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from remp import LLM, SamplingParams
from remp.bench.results import save_result

GROUPS = {  # op name -> group; the first pattern that is in the name wins
    "fused layer ops": ("remp::add_rms_norm", "remp::silu_mul", "remp::rope_cache"),
    "matmul": ("addmm", "aten::mm", "linear", "mkldnn", "aten::bmm", "matmul"),
    "attention": ("paged_attention", "index_select", "scaled_dot", "softmax", "masked_fill", "index_copy", "_flash"),
    "sampling": ("remp::sample", "argmax", "log_softmax", "gather", "sort", "cumsum", "searchsorted", "topk"),
    "elementwise": ("mul", "add", "rsqrt", "pow", "mean", "silu", "cat", "copy_", "to", "neg", "embedding"),
}


def group_of(name: str) -> str:
    for group, patterns in GROUPS.items():
        if any(p in name for p in patterns):
            return group
    return "other ops"


def profile_steps(engine, steps: int) -> dict:
    """Profile `steps` engine steps: wall time, and self CPU time by group and by op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t0
    by_op: dict[str, float] = collections.Counter()
    for e in prof.key_averages():
        by_op[e.key] += e.self_cpu_time_total / 1e6
    by_group: dict[str, float] = collections.Counter()
    for op, s in by_op.items():
        by_group[group_of(op)] += s
    ops = sum(by_group.values())
    by_group["not in an op (Python, scheduling)"] = max(wall - ops, 0.0)
    return {
        "steps": steps,
        "wall_ms_per_step": wall / steps * 1e3,
        "groups_ms_per_step": {g: s / steps * 1e3 for g, s in sorted(by_group.items(), key=lambda x: -x[1])},
        "top_ops_ms_per_step": {op: s / steps * 1e3 for op, s in by_op.most_common(15)},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=10)
    a = p.parse_args()
    llm = LLM(a.model, dtype=a.dtype)
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=a.output_len, temperature=1.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5] * a.input_len}] * 2, SamplingParams(max_tokens=4))  # warm-up
    for i in range(a.num_prompts):
        ids = torch.randint(100, vocab - 100, (a.input_len,), generator=g).tolist()
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    prefill_steps = -(-a.num_prompts * a.input_len // engine.args.max_num_batched_tokens)
    phases = {"prefill": profile_steps(engine, prefill_steps)}
    for _ in range(4):  # into steady decode
        engine.step()
    phases["decode"] = profile_steps(engine, a.decode_steps)
    while engine.has_unfinished_requests():
        engine.step()
    dtype = str(engine.dtype).removeprefix("torch.")
    result = {
        "torch_threads": torch.get_num_threads(),
        "workload": f"{a.num_prompts} x {a.input_len} in / {a.output_len} out",
        "phases": phases,
    }
    llm.shutdown()
    for name, ph in phases.items():
        print(f"{name}: {ph['wall_ms_per_step']:.1f} ms/step over {ph['steps']} steps")
        for grp, ms in ph["groups_ms_per_step"].items():
            print(f"  {grp:40s} {ms:8.1f} ms  {ms / ph['wall_ms_per_step']:5.1%}")
        for op, ms in list(ph["top_ops_ms_per_step"].items())[:8]:
            print(f"    {op:38s} {ms:8.1f} ms")
    save_result(result, f"profile-step-{dtype}", dtype=dtype)


if __name__ == "__main__":
    main()
