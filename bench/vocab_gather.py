"""The lm-head of a TP2 decode step, three ways, in two worker processes with one thread each (as `remp serve`
runs TP2 on 2 cores): whole on TP rank 0 while rank 1 waits (remp before the split), or split by vocabulary
with the logits gathered to rank 0 through gloo or through the shared-memory segment the TP all-reduce uses.

    python bench/vocab_gather.py [--rows 64] [--iters 30]

Times rank 0 from a barrier to holding the whole [rows, vocab] logits (median over iterations), on SmolLM2's
lm-head shape (49152 x 576, float32, packed as the engine packs it). Writes bench/results/vocab_gather-rows<N>.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from remp.bench.results import save_result
from remp.model.linear import FusedLinear
from remp.shm_allreduce import ShmAllReduce, ShmSegment

VOCAB, HIDDEN = 49152, 576


def _worker(rank: int, init: str, shm_name: str, rows: int, iters: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    shm = ShmAllReduce(ShmSegment(2, rows * VOCAB // 2, shm_name), rank)
    shm.set_group([0, 1], epoch=1)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.02
    x = torch.randn(rows, HIDDEN, generator=g)
    whole, half = FusedLinear([weight]), FusedLinear([weight[rank * VOCAB // 2 : (rank + 1) * VOCAB // 2]])

    def run_whole() -> None:
        if rank == 0:
            whole(x)

    def run_gloo() -> None:
        part = half(x)
        parts = [torch.empty_like(part) for _ in range(2)] if rank == 0 else None
        dist.gather(part, parts, dst=0)
        if rank == 0:
            torch.cat(parts, dim=1)

    def run_shm() -> None:
        parts = shm.gather(half(x), 0)
        if rank == 0:
            torch.cat(parts, dim=1)

    times = {}
    for name, fn in (("whole on rank 0", run_whole), ("split, gloo gather", run_gloo), ("split, shm gather", run_shm)):
        samples = []
        for i in range(iters + 3):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 3:  # warm-up: oneDNN primitives, gloo buffers
                samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples) * 1e3
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64, help="sampled rows per step (decode: the running sequences)")
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    seg = ShmSegment(2, a.rows * VOCAB // 2)
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{os.path.join(d, 'rendezvous')}"
        procs = [ctx.Process(target=_worker, args=(r, init, seg.name, a.rows, a.iters, out)) for r in range(2)]
        for q in procs:
            q.start()
        while out.empty() and all(q.is_alive() for q in procs):
            time.sleep(0.2)
        for q in procs:
            q.join(60)
        if out.empty():
            raise SystemExit(f"a worker failed (exit codes {[q.exitcode for q in procs]})")
        times = out.get()
    seg.close(unlink=True)
    result = {
        "rows": a.rows,
        "iters": a.iters,
        "ms_rank0_median": {k: round(v, 2) for k, v in times.items()},
    }
    for k, v in times.items():
        print(f"{k:22s} {v:7.2f} ms")
    save_result(result, f"vocab_gather-rows{a.rows}", dtype="float32")


if __name__ == "__main__":
    main()
