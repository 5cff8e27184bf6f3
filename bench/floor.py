"""The compute floor of the serving workload on this CPU: the workload's FLOPs (every prompt and generated token
through the layers, attention at its context, the lm-head for each sampled row) over the fastest float32 matmul
this machine runs (oneDNN with pre-packed weights where the CPU allows, a prefill-sized GEMM, best of several).

    python bench/floor.py [--num-prompts 64 --input-len 128 --output-len 64]
    python bench/floor.py --serve-rounds 3 [--remp-args "..."]

Prints the FLOPs, the peak, and the floor in seconds and output tok/s; saves bench/results/floor.json. The
fraction of the floor a server reaches is measured with --serve-rounds: it starts `remp serve` and alternates
the peak's measurement with a serving run of the workload (the client and prompts of vs_vllm.py, after one
uncounted warm-up), so that each run is set against the floor of the same minutes: the best peak of the whole
run, since a peak taken while the host was briefly slow would lower the floor; it saves
bench/results/floor-serving.json. (A throughput measured at another time is no fit for the fraction: this
host's speed drifts by up to 30% within an hour.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from remp.bench.results import save_result
from remp.model.linear import FusedLinear
from remp.model.reader import open_checkpoint


def workload_flops(cfg, prompts: int, input_len: int, output_len: int) -> dict[str, float]:
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size  # weights a token multiplies
    tokens = prompts * (input_len + output_len - 1)  # the last output token is sampled, never fed back
    # attention: q.k and p.v, 2 FLOPs each per (query head, key, dim); position i attends to i + 1 keys
    contexts = prompts * sum(i + 1 for i in range(input_len + output_len - 1))
    return {
        "layers": 2.0 * per_layer * layers * tokens,
        "attention": 4.0 * cfg.num_attention_heads * d * layers * contexts,
        "lm_head": 2.0 * h * cfg.vocab_size * prompts * output_len,
    }


def peak_flops(repeats: int = 7) -> float:
    """FLOP/s of the best float32 GEMM of prefill size through remp's own linear (packed where it packs)."""
    x, w = torch.randn(2048, 576), torch.randn(3072, 576)
    lin = FusedLinear([w])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lin(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 * 576 * 3072 / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--serve-rounds", type=int, default=0, help="serve and measure, alternating with the peak")
    p.add_argument("--remp-args", default="--dtype float32", help="the floor is float32's: keep --dtype float32")
    a = p.parse_args()
    if a.serve_rounds:
        return serve_rounds(a)
    flops = workload_flops(open_checkpoint(a.model).config, a.num_prompts, a.input_len, a.output_len)
    total, peak = sum(flops.values()), peak_flops()
    floor_s = total / peak
    result = {
        "torch_threads": torch.get_num_threads(),
        "workload": f"{a.num_prompts} x {a.input_len} in / {a.output_len} out",
        "tflop": {k: round(v / 1e12, 3) for k, v in flops.items()} | {"total": round(total / 1e12, 3)},
        "peak_gflop_s": round(peak / 1e9, 1),
        "floor_s": round(floor_s, 2),
        "floor_output_tok_s": round(a.num_prompts * a.output_len / floor_s, 1),
    }
    print(json.dumps(result, indent=1))
    save_result(result, "floor", dtype="float32")


def serve_rounds(a: argparse.Namespace) -> None:
    """peak, serving run, peak, serving run, ..., peak: each run against the floor of the best peak."""
    import tempfile

    from vs_vllm import CLIENT, dtype_of, remp_server, run_client

    if a.num_prompts != 64 or a.input_len != 128 or a.output_len != 64:
        raise SystemExit("--serve-rounds runs vs_vllm.py's client, whose workload is 64 x 128 in / 64 out")
    if dtype_of(a.remp_args) != "float32":
        raise SystemExit("the floor is float32 matmuls': --remp-args must keep --dtype float32")
    total = sum(workload_flops(open_checkpoint(a.model).config, a.num_prompts, a.input_len, a.output_len).values())
    floor_tok_s = lambda peak: a.num_prompts * a.output_len * peak / total
    logs = Path(tempfile.mkdtemp(prefix="floor-"))
    server = remp_server(8765, a.remp_args, logs / "remp.log")
    rounds = []
    try:
        server.start(timeout_s=900)
        run_client(8765, "", logs / "warmup.json")
        peaks = [peak_flops()]
        for r in range(a.serve_rounds):
            rounds.append({"output_tok_s": round(run_client(8765, "", logs / f"run-{r}.json")["output_throughput"], 1)})
            peaks.append(peak_flops())
    finally:
        server.stop(timeout_s=60)
    floor = floor_tok_s(max(peaks))
    for r, one in enumerate(rounds):
        one["fraction_of_floor"] = round(one["output_tok_s"] / floor, 3)
        print(
            f"round {r}: {one['output_tok_s']} output tok/s against a floor of {floor:.1f}: {one['fraction_of_floor']}"
        )
    result = {
        "workload": CLIENT,
        "remp_args": a.remp_args,
        "peak_gflop_s": [round(p / 1e9, 1) for p in peaks],
        "floor_output_tok_s": round(floor, 1),
        "rounds": rounds,
    }
    save_result(result, "floor-serving", dtype="float32")


if __name__ == "__main__":
    main()
