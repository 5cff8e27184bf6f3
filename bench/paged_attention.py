"""One layer's attention over the paged KV cache, two ways: the torch path, or the native kernel that reads the
blocks in place (remp/kernels/paged_attention.cpp). SmolLM2's head shape: 3 KV heads x 3 q heads, D 64.
At decode the torch path gathers the K/V blocks through the block tables into a padded copy, then runs matmuls
and a masked softmax; for first prefill chunks (--prefill) it copies q, k, v into a padded layout, runs causal
flash attention and scatters the output back.

    python bench/paged_attention.py [--seqs 64] [--context 128] [--dtype float32] [--threads 1,2] [--rounds 5]
    python bench/paged_attention.py --prefill --seqs 16 --context 128
    python bench/paged_attention.py --cold --threads 2   # 30 layers' caches in turn, as in a step

At decode, sequences have contexts from --context to about 1.5x it, their blocks scattered over the pool; with
--prefill, each sequence is a first chunk of --context tokens. Per thread count,
rounds alternate the two ways; each round's figure is a median over 50 calls. Prints every round and the median
over rounds; writes bench/results/paged_attention[-prefill][-cold].json. The gather's time is bimodal between processes (2.3 or
7-11 ms per layer at the defaults): its fresh 3 MB buffers either come from the heap or are mapped anew, page
by page, depending on glibc's adaptive mmap threshold. The kernel allocates nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from remp.bench.results import save_result
from remp.kernels import attention as native
from remp.model import attention
from remp.model.attention import SeqChunk, build_metadata, paged_attention, write_kv

KVH, GROUP, D, BS = 3, 3, 64, 16
LAYERS = 30


def median_ms(fn, iters: int = 50, before=lambda: None) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill", action="store_true", help="first prefill chunks of --context tokens each")
    p.add_argument("--cold", action="store_true", help=f"{LAYERS} layers' caches in turn, read from memory")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    if not native.available(dtype, torch.device("cpu")):
        raise SystemExit("the native kernel is not available here (no compiler, or REMP_NATIVE_KERNELS=0)")
    g = torch.Generator().manual_seed(0)
    per_seq = -(-(a.context * 3 // 2) // BS) + 1
    blocks = a.seqs * per_seq
    # --cold: one cache per layer, all 30 read in turn after 64 MB are written elsewhere (as a step's linears
    # would), so that K/V come from memory as in the engine, not from the last-level cache
    kvs = [torch.randn(2, KVH, blocks, BS, D, generator=g).to(dtype) for _ in range(LAYERS if a.cold else 1)]
    scribble = torch.empty(16 << 20 if a.cold else 0)
    perm = torch.randperm(blocks, generator=g).tolist()
    tables = [perm[b * per_seq : (b + 1) * per_seq] for b in range(a.seqs)]
    if a.prefill:
        chunks = [SeqChunk([1] * a.context, 0, tables[b], True) for b in range(a.seqs)]
    else:
        chunks = [SeqChunk([1], a.context + (b * 7) % (a.context // 2) - 1, tables[b], True) for b in range(a.seqs)]
    meta = build_metadata(chunks, BS, GROUP)
    T = meta.num_tokens
    qkv = torch.randn(T, (KVH * GROUP + 2 * KVH) * D, generator=g).to(dtype)  # as the model passes it: strided
    q = qkv[:, : KVH * GROUP * D].view(T, KVH, GROUP, D)
    q_cols, k_cols = KVH * GROUP * D, KVH * D
    k, v = qkv[:, q_cols : q_cols + k_cols].view(T, KVH, D), qkv[:, q_cols + k_cols :].view(T, KVH, D)
    for layer in kvs:
        write_kv(layer[0], layer[1], meta.slot_mapping, k, v)
    available = native.available

    def kernel():
        for layer in kvs:
            out = paged_attention(q, k, v, layer[0], layer[1], meta)
        return out

    def torch_path():
        attention.native.available = lambda *_: False
        try:
            for layer in kvs:
                out = paged_attention(q, k, v, layer[0], layer[1], meta)
            return out
        finally:
            attention.native.available = available

    per_layer = lambda fn: median_ms(fn, iters=15 if a.cold else 50, before=lambda: scribble.fill_(1.0)) / len(kvs)

    torch.testing.assert_close(kernel().double(), torch_path().double(), rtol=1e-4, atol=1e-4)
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        rounds = [(per_layer(torch_path), per_layer(kernel)) for _ in range(a.rounds)]
        torch_ms, native_ms = (statistics.median(r[i] for r in rounds) for i in (0, 1))
        rows.append({"threads": threads, "rounds": rounds, "torch_ms": torch_ms, "native_ms": native_ms})
        each = ", ".join(f"{t:.2f}/{n:.2f}" for t, n in rounds)
        print(f"{threads} thread(s): torch / native ms per layer by round: {each}; medians "
              f"{torch_ms:.2f} / {native_ms:.2f}, {torch_ms / native_ms:.2f}x")  # fmt: skip
    result = {
        "cold": a.cold,
        "shape": f"{a.seqs} {'first chunks of' if a.prefill else 'decode tokens at context'} "
        f"{a.context}{'' if a.prefill else f'-{a.context * 3 // 2}'}, {KVH} KV x {GROUP} q heads, D {D}",
        "rows": rows,
    }
    save_result(result, f"paged_attention{'-prefill' if a.prefill else ''}{'-cold' if a.cold else ''}", dtype=a.dtype)


if __name__ == "__main__":
    main()
