"""The linears of one decode step for 1-4 rows (a single stream, a small batch), two ways: oneDNN with packed
weights (what more rows use) or the native kernel that streams the canonical weights in place
(remp/kernels/small_linear.cpp). SmolLM2's shapes: 30 layers of q|k|v, o, gate|up and down, then the lm-head,
538 MB of float32 weights, with 64 MB written elsewhere before each pass so that they come from memory.

    python bench/small_linear.py [--rounds 3] [--dtype float32]

Per row count, rounds alternate the two ways; each round's figure is a median over 7 passes. Prints ms per step
and the weights' read rate; writes bench/results/small_linear.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from remp.bench.results import save_result
from remp.kernels import small_linear as native
from remp.model.linear import FusedLinear

LAYERS, H, I, KV, VOCAB = 30, 576, 1536, 192, 49152
SHAPES = [[(H, H), (KV, H), (KV, H)], [(H, H)], [(I, H), (I, H)], [(H, I)]]  # q|k|v, o, gate|up, down


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    if not native.available(dtype, torch.device("cpu")):
        raise SystemExit("the native kernel is not available here (no compiler, or REMP_NATIVE_KERNELS=0)")
    g = torch.Generator().manual_seed(0)
    layers = [[[torch.randn(n, k, generator=g).to(dtype) * 0.02 for n, k in parts] for parts in SHAPES]]
    layers += [[[w.clone() for w in parts] for parts in layers[0]] for _ in range(LAYERS - 1)]
    head = torch.randn(VOCAB, H, generator=g).to(dtype) * 0.02
    linears = [[FusedLinear(parts) for parts in layer] for layer in layers] + [[FusedLinear([head])]]
    weight_bytes = sum(w.numel() * w.element_size() for layer in layers for parts in layer for w in parts)
    weight_bytes += head.numel() * head.element_size()
    scribble = torch.empty(16 << 20)

    def step(xs: list[torch.Tensor], small: bool) -> float:
        scribble.fill_(1.0)
        t0 = time.perf_counter()
        for layer in linears:
            for lin, x in zip(layer, xs):
                if small:
                    native.small_linear(x, lin.small)
                else:
                    lin.small, keep = None, lin.small  # the oneDNN (or matmul) path FusedLinear takes past 4 rows
                    try:
                        lin(x)
                    finally:
                        lin.small = keep
        return time.perf_counter() - t0

    rows = []
    for m in range(1, native.MAX_ROWS + 1):
        xs = [torch.randn(m, parts[0][1], generator=g).to(dtype) for parts in SHAPES]
        rounds = []
        for _ in range(a.rounds):
            rounds.append([statistics.median(step(xs, small) for _ in range(7)) * 1e3 for small in (False, True)])
        onednn, small = (statistics.median(r[i] for r in rounds) for i in (0, 1))
        rows.append({"rows": m, "rounds": rounds, "onednn_ms": onednn, "small_linear_ms": small})
        print(
            f"{m} row(s): oneDNN / small_linear ms per step by round: "
            + ", ".join(f"{o:.1f}/{s:.1f}" for o, s in rounds)
            + f"; medians {onednn:.1f} / {small:.1f}, {onednn / small:.2f}x; "
            f"{weight_bytes / small / 1e6:.1f} against {weight_bytes / onednn / 1e6:.1f} GB/s of weights"
        )
    result = {"torch_threads": torch.get_num_threads(), "weights_mb": round(weight_bytes / 1e6), "rows": rows}
    save_result(result, "small_linear", dtype=a.dtype)


if __name__ == "__main__":
    main()
