"""`remp` command line: `remp serve ...` (OpenAI-compatible server), `remp generate ...` (offline), `remp simulate`."""

from __future__ import annotations

import argparse
import sys
import time

from remp.multinode.protocol import NodeUnreachable


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: bundled SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float64")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("-dp", "--data-parallel-size", type=int, default=1, help="replicas of the TP x PP shape")
    p.add_argument(
        "--max-workers", type=int, default=None, help="the most workers a switch may grow the pool to (default tp*pp)"
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt prefixes seen before (default on, as vLLM)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout-s", type=float, default=120.0)
    p.add_argument("--no-worker-recovery", dest="worker_recovery", action="store_false", help="stop when a worker dies")
    p.add_argument("--respawn", action="store_true", help="replace a worker that dies and keep the topology")
    p.add_argument("--switch-staging-gb", type=float, default=2.0, help="live switch: extra memory per worker")
    p.add_argument("--switch-precopy-duty", type=float, default=0.3, help="live switch: share of time to copy")
    p.add_argument("--switch-timeout-s", type=float, default=300.0, help="a switch not ready by then is called off")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per worker, NCCL")
    p.add_argument(
        "--topology-policy", default="manual", choices=["manual", "auto"], help="auto: pick TP x PP from the load"
    )
    p.add_argument("--candidates", dest="topology_candidates", default=None, help="topologies auto may pick")
    p.add_argument("--perf-profile", default=None, help="performance profile for auto (default: measured, cached)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="auto's TTFT SLO (default 5x unloaded)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="auto's TPOT SLO (default 5x unloaded)")
    p.add_argument("--policy-interval-s", type=float, default=5.0, help="auto decides this often")
    p.add_argument("--policy-min-dwell-s", type=float, default=60.0, help="auto keeps a topology at least this long")
    p.add_argument("--policy-window-s", type=float, default=30.0, help="auto measures the load over this window")
    n = p.add_argument_group("several nodes (torchrun / vLLM style: the same command on each node)")
    n.add_argument("--nnodes", type=int, default=1)
    n.add_argument("--node-rank", type=int, default=0, help="0: the head (engine, server); others: --headless")
    n.add_argument("--master-addr", default="127.0.0.1", help="the head node's address, reachable from every node")
    n.add_argument("--master-port", type=int, default=29500, help="the head's TCP store port")
    n.add_argument("--workers-per-node", type=int, default=None, help="this node's workers (default tp*pp/nnodes)")
    n.add_argument("--node-join-timeout-s", type=float, default=300.0, help="how long the head waits for the nodes")
    n.add_argument("--intra-node-bandwidth-gbs", type=float, default=5.0, help="planner: GB/s inside a node")
    n.add_argument("--inter-node-bandwidth-gbs", type=float, default=1.25, help="planner: GB/s between nodes")


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        model=a.model,
        dtype=a.dtype,
        max_model_len=a.max_model_len,
        tensor_parallel_size=a.tensor_parallel_size,
        pipeline_parallel_size=a.pipeline_parallel_size,
        data_parallel_size=a.data_parallel_size,
        max_workers=a.max_workers,
        block_size=a.block_size,
        kv_cache_memory_gb=a.kv_cache_memory_gb,
        num_kv_blocks=a.num_kv_blocks,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        enable_prefix_caching=a.enable_prefix_caching,
        seed=a.seed,
        worker_timeout_s=a.worker_timeout_s,
        worker_recovery=a.worker_recovery,
        respawn=a.respawn,
        switch_staging_gb=a.switch_staging_gb,
        switch_precopy_duty=a.switch_precopy_duty,
        switch_timeout_s=a.switch_timeout_s,
        device=a.device,
        topology_policy=a.topology_policy,
        topology_candidates=a.topology_candidates,
        perf_profile=a.perf_profile,
        slo_ttft_ms=a.slo_ttft_ms,
        slo_tpot_ms=a.slo_tpot_ms,
        policy_interval_s=a.policy_interval_s,
        policy_min_dwell_s=a.policy_min_dwell_s,
        policy_window_s=a.policy_window_s,
        nnodes=a.nnodes,
        master_addr=a.master_addr,
        master_port=a.master_port,
        workers_per_node=a.workers_per_node,
        node_join_timeout_s=a.node_join_timeout_s,
        intra_node_bandwidth_gbs=a.intra_node_bandwidth_gbs,
        inter_node_bandwidth_gbs=a.inter_node_bandwidth_gbs,
    )


def cmd_serve(a: argparse.Namespace) -> int:
    from remp.engine_args import EngineArgs
    from remp.entrypoints.serve import serve

    if a.headless:
        return cmd_headless(a)
    if a.node_rank != 0:
        raise ValueError(f"--node-rank {a.node_rank} runs no server: add --headless (node 0 is the head)")
    kwargs = engine_kwargs(a)
    kwargs["model"] = a.model_pos or a.model
    kwargs["distributed_executor_backend"] = "mp"  # keep the model out of the HTTP server's process
    if a.max_request_bytes < 1 or a.shutdown_timeout < 0:
        raise ValueError("--max-request-bytes must be positive and --shutdown-timeout non-negative")
    serve(
        EngineArgs.from_kwargs(**kwargs),
        a.host,
        a.port,
        a.served_model_name,
        a.api_key,
        a.admin_token,
        a.max_request_bytes,
        a.shutdown_timeout,
        chat_template=load_chat_template(a.chat_template),
        generation_config=a.generation_config,
    )
    return 0


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file with the template, or the template itself (as vLLM's); checked now."""
    if value is None:
        return None
    from pathlib import Path

    import jinja2

    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {value!r}: not a file, and not a valid Jinja template ({e})") from None
    return text


def cmd_headless(a: argparse.Namespace) -> int:
    """A node that only runs workers for the head node's engine (vLLM's --headless)."""
    from remp.engine_args import workers_on_node
    from remp.multinode.agent import run_node

    if a.nnodes < 2 or a.node_rank < 1 or a.node_rank >= a.nnodes:
        raise ValueError(f"--headless needs --nnodes 2 or more and --node-rank 1..nnodes-1, got {a.node_rank}")
    workers = workers_on_node(
        a.data_parallel_size * a.tensor_parallel_size * a.pipeline_parallel_size, a.nnodes, a.workers_per_node
    )
    if workers < 1:
        raise ValueError("give --workers-per-node (or -tp/-pp as on the head)")
    if a.device == "cpu":
        from remp.kernels.build import build_all

        build_all()  # this machine's own build, before its workers start
    return run_node(a.node_rank, a.master_addr, a.master_port, workers, a.node_join_timeout_s)


def cmd_generate(a: argparse.Namespace) -> int:
    from remp import LLM, SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.sampling_seed)
    t0 = time.perf_counter()
    with LLM(**engine_kwargs(a)) as llm:
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        if a.chat:
            out = llm.chat([{"role": "user", "content": a.prompt}], params)[0]
        else:
            out = llm.generate(a.prompt, params)[0]
        gen = time.perf_counter() - t0
    print(out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    print(
        f"[{n} tokens in {gen:.2f} s ({n / gen:.1f} tok/s), load {load:.1f} s, "
        f"finish_reason={out.outputs[0].finish_reason}]",
        file=sys.stderr,
    )
    return 0


def cmd_profile(a: argparse.Namespace) -> int:
    from remp import LLMEngine
    from remp.cpu_features import cpu_features
    from remp.policy.measured import measure
    from remp.policy.runner import parse_candidates

    kwargs = engine_kwargs(a) | {"topology_policy": "manual", "distributed_executor_backend": "mp"}
    t0 = time.perf_counter()
    engine = LLMEngine(**kwargs)
    try:
        start_s = time.perf_counter() - t0
        shapes = parse_candidates(a.topology_candidates, engine.model_config, engine.max_workers)
        profile = measure(engine, shapes, cpu_features().describe(), start_s)
    finally:
        engine.shutdown()
    print(f"saved {profile.save(a.output)}")
    for name, (c0, c1, c2) in profile.fits.items():
        print(f"{name}: stage = {c0 * 1e3:.2f} ms + {c1 * 1e6:.1f} us/token + {c2 * 1e9:.2f} ns/KV token")
    return 0


def _missing_extra(e: ImportError) -> int:
    print(
        f"remp bench serve needs the `bench` extra ({e.name} is missing): pip install 'remp[bench]' "
        "(from a checkout: pip install -e '.[bench]')",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="remp", description="remp: LLM serving with live TP/PP reconfiguration")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text offline from one prompt")
    add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a live topology admin API")
    s.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    add_engine_args(s)
    s.add_argument(
        "--headless", action="store_true", help="run only this node's workers for the head (--node-rank K >= 1)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (the log names it)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    s.add_argument("--admin-token", default=None, help="enable /admin (reconfigure, topology) with this token")
    s.add_argument(
        "--max-request-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413 (default 4 MiB)"
    )
    s.add_argument("--chat-template", default=None, help="a chat template (file or text) instead of the model's")
    s.add_argument(
        "--generation-config",
        default="auto",
        choices=["auto", "vllm"],
        help="auto: sampling defaults from the model's generation_config.json; vllm: vLLM's defaults",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds running requests get to finish after SIGINT/SIGTERM before their streams are ended",
    )
    s.set_defaults(func=cmd_serve)
    pr = sub.add_parser("profile", help="measure step times of every candidate topology (for --topology-policy auto)")
    add_engine_args(pr)
    pr.add_argument("-o", "--output", default="remp-profile.json")
    pr.set_defaults(func=cmd_profile)
    sim = sub.add_parser("simulate", help="replay a workload on a simulated GPU node (scheduler, policy, planner)")
    from remp.sim.cli import add_cli_args as add_sim_args
    from remp.sim.cli import run_cli as run_sim

    add_sim_args(sim)
    sim.set_defaults(func=run_sim)
    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bs = b.add_parser("serve", help="load generator for any OpenAI-compatible server (like `vllm bench serve`)")
    try:
        from remp.bench.serve import add_cli_args, run_cli
    except ImportError as e:  # aiohttp / matplotlib are the `bench` extra, not needed to serve
        bs.add_argument("rest", nargs=argparse.REMAINDER)
        bs.set_defaults(func=lambda a, e=e: _missing_extra(e))
    else:
        add_cli_args(bs)
        bs.set_defaults(func=run_cli)
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, TypeError, NotImplementedError, NodeUnreachable) as e:
        print(f"remp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
