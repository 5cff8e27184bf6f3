"""Switches on a pool spread over two "machines" (network namespaces joined by a veth pair; needs root), against
the same switch on one machine, and the planner's placement over a shaped link with and without per-link costs.

    python bench/multinode.py [--model PATH] [--dtype float32] [--shape "tbf rate 1gbit burst 64kb latency 50ms"]

Runs, each with `--requests` requests in flight (64-token prompts, 48 output tokens):
  1. TP2xPP2 -> TP1xPP4, stop-the-world, 4 workers on one machine;
  2. the same with 2 workers on each of two namespaces (unshaped veth);
  3. TP1xPP4 -> TP2xPP1 on two namespaces with the link shaped (--shape: a tc qdisc, netem where the kernel has it), the planner pricing bytes per link (intra
     5 GB/s, inter from --inter-gbs), then the same with bytes alone: the placement each picks, the switch's
     pause, and decode throughput after it (the TP group's all-reduces cross the link or not).
Prints a table; writes bench/results/multinode.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PORT = 29631


def drive(spec: dict) -> dict:
    """Head side: an engine over `spec`'s pool, requests in flight, one switch at step 4, then to the end."""
    import torch

    from remp import LLMEngine, SamplingParams

    nodes = dict(nnodes=2, master_addr=spec["addr"], master_port=PORT, workers_per_node=2) if spec["addr"] else {}
    engine = LLMEngine(
        model=spec["model"],
        dtype=spec["dtype"],
        tensor_parallel_size=spec["from"][0],
        pipeline_parallel_size=spec["from"][1],
        max_model_len=512,
        inter_node_bandwidth_gbs=spec["inter_gbs"],
        worker_timeout_s=120,
        **nodes,
    )
    engine.switcher.link_costs = spec["link_costs"]
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    for i in range(spec["requests"]):
        engine.add_request(str(i), {"prompt_token_ids": torch.randint(100, 40000, (64,), generator=g).tolist()}, params)
    report, steps = None, []  # (time, tokens) of each step after the switch
    try:
        while engine.has_unfinished_requests():
            if engine.num_steps == 4 and report is None:
                report = engine.reconfigure(*spec["to"], mode="stop")
            t0 = time.perf_counter()
            outs = engine.step()
            if report is not None:
                steps.append((time.perf_counter() - t0, len(outs)))
        ex = engine.executor
        decode = [n / dt for dt, n in steps[2:] if dt > 0]
        return {
            "placement": list(engine.topology.placement),
            "nodes_of_stages": [
                [ex.nodes[w] for w in engine.topology.stage_workers(s)] for s in range(engine.topology.pp)
            ],
            "pause_s": report.pause_s,
            "wall_s": report.wall_s,
            "bytes_moved": sum(report.bytes_moved.values()),
            "decode_tok_s_after": statistics.median(decode) if decode else None,
        }
    finally:
        engine.shutdown()


def run(args, label: str, frm, to, two_nodes: bool, shape: str | None = None, link_costs: bool = True) -> dict:
    from remp.tools import netns

    spec = dict(model=args.model, dtype=args.dtype, requests=args.requests, inter_gbs=args.inter_gbs,
                link_costs=link_costs, addr=None, **{"from": frm, "to": to})  # fmt: skip
    me = [str(Path(__file__).resolve()), "--drive"]
    if not two_nodes:
        out = subprocess.run([sys.executable, *me, json.dumps(spec)], capture_output=True, text=True, timeout=900)
        return _result(label, out.returncode, out.stdout, out.stderr)
    nodes = netns.two_nodes()
    try:
        if shape:
            nodes.shape(0, shape)
            nodes.shape(1, shape)
        spec["addr"] = nodes.addrs[0]
        agent = nodes.start_worker_node(PORT, 2)
        head = nodes.popen(0, [*me, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = head.communicate(timeout=900)
        agent.wait(30)
        return _result(label, head.returncode, stdout, stderr)
    finally:
        nodes.close()


def _result(label: str, rc: int, stdout: str, stderr: str) -> dict:
    if rc != 0:
        raise RuntimeError(f"{label}: the head failed ({rc}):\n{stderr[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["run"] = label
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--shape", default="tbf rate 1gbit burst 64kb latency 50ms", help="tc qdisc on both link ends")
    p.add_argument("--inter-gbs", type=float, default=0.125, help="the planner's inter-node GB/s (1 Gbit/s)")
    p.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.drive:
        print(json.dumps(drive(json.loads(a.drive))), flush=True)
        return
    from remp.bench.results import save_result
    from remp.tools import netns

    why = netns.reason_unavailable()
    if why:
        sys.exit(f"bench/multinode.py: {why}")
    rows = [
        run(a, "one machine: TP2xPP2 -> TP1xPP4", (2, 2), (1, 4), two_nodes=False),
        run(a, "two namespaces: TP2xPP2 -> TP1xPP4", (2, 2), (1, 4), two_nodes=True),
        run(a, f"{a.shape}, priced: TP1xPP4 -> TP2xPP1", (1, 4), (2, 1), True, a.shape, link_costs=True),
        run(a, f"{a.shape}, bytes only: TP1xPP4 -> TP2xPP1", (1, 4), (2, 1), True, a.shape, link_costs=False),
    ]
    print("\n| run | placement (nodes of each stage) | pause s | wall s | MB moved | decode tok/s after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tok = f"{r['decode_tok_s_after']:.1f}" if r["decode_tok_s_after"] else "-"
        print(f"| {r['run']} | {r['placement']} {r['nodes_of_stages']} | {r['pause_s']:.2f} | {r['wall_s']:.2f} | "
              f"{r['bytes_moved'] / 1e6:.0f} | {tok} |")  # fmt: skip
    result = {"model": a.model or "default (SmolLM2-135M GGUF)", "shape": a.shape, "rows": rows}
    save_result(result, "multinode", dtype=a.dtype)


if __name__ == "__main__":
    main()
