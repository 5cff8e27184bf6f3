"""What the packed copy of the weights buys: the linears of one step (SmolLM2's shapes: 30 layers of q|k|v, o,
gate|up, down, and the lm-head) for a number of rows, three ways:

- packed: oneDNN from weights reordered for it (FusedLinear's path past 4 rows: a second copy of every linear);
- canonical: a plain matmul on the canonical weights (q|k|v and gate|up as views of one buffer; no copy);
- small: the native kernel that streams the canonical weights in place (1-4 rows only).

    python bench/packed_linear.py [--dtypes float32,bfloat16] [--rows 1,4,8,16,64,256,1024] [--rounds 3]

Each figure is a median over rounds that alternate the ways, each round a median of passes; with 64 MB written
elsewhere before each pass, so the weights come from memory as in serving. Prints ms per step and the copy's
size; writes bench/results/packed_linear.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from remp.bench.results import save_result
from remp.kernels import small_linear as native
from remp.model.linear import FusedLinear, colocate

LAYERS, H, I, KV, VOCAB = 30, 576, 1536, 192, 49152
SHAPES = [[(H, H), (KV, H), (KV, H)], [(H, H)], [(I, H), (I, H)], [(H, I)]]  # q|k|v, o, gate|up, down


def build(dtype: torch.dtype) -> tuple[list[list[FusedLinear]], int]:
    g = torch.Generator().manual_seed(0)
    linears = []
    for _ in range(LAYERS):
        parts = [colocate([torch.randn(n, k, generator=g).to(dtype) * 0.02 for n, k in seg]) for seg in SHAPES]
        linears.append([FusedLinear(p) for p in parts])
    linears.append([FusedLinear([torch.randn(VOCAB, H, generator=g).to(dtype) * 0.02])])
    packed = sum(lin.weight.numel() * lin.weight.element_size() for layer in linears for lin in layer if lin.packed)
    return linears, packed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", default="1,4,8,16,64,256,1024")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    scribble = torch.empty(16 << 20)
    results = []
    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        linears, packed_bytes = build(dtype)
        if not packed_bytes:
            print(f"{dtype_name}: oneDNN does not pack it on this CPU; nothing to compare")
            continue
        # each fused linear's canonical weight: its colocated segments as one view (what a matmul would read)
        canonical = [[lin.source.as_strided(tuple(lin.weight.shape), (lin.weight.shape[1], 1)) for lin in layer]
                     for layer in linears]  # fmt: skip

        def step(xs: list[torch.Tensor], way: str, linears=linears, canonical=canonical) -> float:
            scribble.fill_(1.0)
            t0 = time.perf_counter()
            for layer, weights in zip(linears, canonical):
                for lin, w, x in zip(layer, weights, xs):
                    if way == "small":
                        native.small_linear(x, lin.small)
                    elif way == "packed":
                        torch.ops.mkldnn._linear_pointwise(x, lin.weight, None, "none", [], "")
                    else:
                        F.linear(x, w)
            return time.perf_counter() - t0

        for m in (int(r) for r in a.rows.split(",")):
            g = torch.Generator().manual_seed(m)
            xs = [torch.randn(m, seg[0][1], generator=g).to(dtype) for seg in SHAPES]
            ways = ["packed", "canonical"] + (["small"] if m <= native.MAX_ROWS else [])
            passes = 7 if m <= 64 else 3
            rounds = [{w: statistics.median(step(xs, w) for _ in range(passes)) * 1e3 for w in ways}
                      for _ in range(a.rounds)]  # fmt: skip
            row = {"dtype": dtype_name, "rows": m, "rounds": rounds}
            row |= {f"{w}_ms": statistics.median(r[w] for r in rounds) for w in ways}
            results.append(row)
            print(
                f"{dtype_name} {m:5d} rows: "
                + ", ".join(f"{w} {row[f'{w}_ms']:.1f}" for w in ways)
                + f" ms; packed {row['canonical_ms'] / row['packed_ms']:.2f}x canonical"
                + f", copy {packed_bytes / 1e6:.0f} MB",
                flush=True,
            )
        results.append({"dtype": dtype_name, "packed_copy_bytes": packed_bytes})
    save_result({"torch_threads": torch.get_num_threads(), "rows": results}, "packed_linear", dtype=None)


if __name__ == "__main__":
    main()
