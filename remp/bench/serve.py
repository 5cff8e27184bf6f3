"""`remp bench serve`: load an OpenAI-compatible server (remp or vLLM) with streaming requests, shaped like
`vllm bench serve`, and report TTFT/TPOT/ITL/E2EL, throughput and goodput, per phase when the load shifts.

    python -m remp.bench.serve --dataset-name random --random-input-len 256 --random-output-len 64 \\
        --num-prompts 200 --request-rate 8 --poll-topology --admin-token T --timeline run.png --save-result
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from remp.bench.datasets import (
    DATASETS,
    DatasetOptions,
    Phase,
    PhaseWindow,
    SampleRequest,
    parse_phases,
    plan,
    trace_requests,
)
from remp.bench.metrics import RequestResult, compute_metrics, format_summary, parse_goodput, phase_metrics
from remp.bench.timeline import TopologyPoller, plot_timeline

ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--endpoint", default=None, help="default: /v1/completions, or by --backend")
    p.add_argument("--backend", choices=sorted(ENDPOINTS), default=None, help="default: inferred from --endpoint")
    p.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", choices=DATASETS, default="random")
    d.add_argument("--dataset-path", default=None, help="JSON/JSONL file for jsonl/sharegpt")
    d.add_argument("--num-prompts", type=int, default=100)
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*[1-r, 1+r]")
    d.add_argument("--random-vocab-size", type=int, default=32000, help="token ids drawn below this")
    d.add_argument("--synthetic-input-len", type=int, default=200, help="median prompt length of synthetic-chat")
    d.add_argument("--synthetic-output-len", type=int, default=150, help="median output length of synthetic-chat")
    d.add_argument("--synthetic-max-input-len", type=int, default=2048)
    d.add_argument("--synthetic-max-output-len", type=int, default=1024)
    d.add_argument(
        "--prefix-chat-system-len",
        type=int,
        default=1000,
        help="prefix-chat: tokens of the system prompt all users share (--random-input-len: each new message, "
        "--random-output-len: each answer; --num-prompts: users x turns)",
    )
    d.add_argument("--prefix-chat-users", type=int, default=64, help="prefix-chat: users, each a chat of its own")
    d.add_argument("--tokenizer", default=None, help="HF tokenizer for exact counts and vocabulary (optional)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--ignore-eos", action="store_true")
    d.add_argument("--temperature", type=float, default=0.0)
    a = p.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf sends all at once")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    a.add_argument("--max-concurrency", type=int, default=None)
    a.add_argument(
        "--phases",
        default=None,
        help="JSON list (inline or a file) of {duration_s|num_prompts, request_rate, input_len, "
        "output_len, dataset?, burstiness?, range_ratio?, name?}; replaces --num-prompts and "
        "--request-rate",
    )
    a.add_argument(
        "--trace",
        default=None,
        help="replay a CSV trace (arrived_at, num_prefill_tokens, num_decode_tokens; e.g. the Azure "
        "conversation trace): its arrivals and lengths, with random prompts; replaces --num-prompts, --request-rate",
    )
    a.add_argument("--trace-time-scale", type=float, default=1.0, help="multiply arrival times (0.5: 2x the load)")
    a.add_argument("--trace-duration-s", type=float, default=None, help="only the first D seconds (scaled)")
    a.add_argument("--trace-max-model-len", type=int, default=None, help="cut requests to fit this context")
    a.add_argument("--retry-failed", type=int, default=0, help="retries of a failed request (5xx, 429, network)")
    a.add_argument("--timeout-s", type=float, default=3600.0, help="per request")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")
    o.add_argument("--metric-percentiles", default="90,99")
    o.add_argument("--save-result", action="store_true")
    o.add_argument("--result-dir", default=".")
    o.add_argument("--result-filename", default=None)
    o.add_argument("--timeline", default=None, metavar="PNG")
    o.add_argument("--poll-topology", action="store_true", help="poll /admin/topology (or /metrics) every 0.5 s")
    o.add_argument("--admin-token", default=None)
    o.add_argument("--poll-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    o.add_argument("--disable-tqdm", action="store_true")


# --- one request ---------------------------------------------------------------------------------------------


def build_payload(req: SampleRequest, model: str, chat: bool, ignore_eos: bool, temperature: float) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    if chat:
        if not isinstance(req.prompt, str):
            raise ValueError("chat endpoints need text prompts")
        body |= {"messages": [{"role": "user", "content": req.prompt}], "max_completion_tokens": req.output_len}
    else:
        body |= {"prompt": req.prompt, "max_tokens": req.output_len}
    return body


def _chunk_text(data: dict, chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""
    return choices[0].get("text") or ""


class _Retryable(Exception):
    """A failure worth another attempt (server error, overload, network)."""


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict,
    body: dict,
    chat: bool,
    res: RequestResult,
    t0: float,
    timeout_s: float,
) -> None:
    """Stream one attempt into `res` (times relative to t0, the first attempt's send). Raises on failure."""
    res.ttft, res.itl, res.output_tokens = 0.0, [], 0
    usage: dict | None = None
    chunks, last, done, buf = 0, 0.0, False, b""
    async with session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        if resp.status != 200:
            msg = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            raise (_Retryable(msg) if resp.status >= 500 or resp.status == 429 else RuntimeError(msg))
        async for piece in resp.content.iter_any():
            buf += piece
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": keep-alive" comments, event: lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                data = json.loads(payload)
                if "error" in data or data.get("object") == "error":
                    raise RuntimeError(f"stream error: {json.dumps(data.get('error', data))[:300]}")
                now = time.perf_counter() - t0
                if _chunk_text(data, chat):
                    if chunks == 0:
                        res.ttft = now
                    else:
                        res.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if data.get("usage"):
                    usage = data["usage"]
    if not done:
        raise _Retryable("stream ended without data: [DONE]")
    res.latency = time.perf_counter() - t0
    res.output_tokens = int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else chunks
    if usage and "prompt_tokens" in usage:
        res.prompt_tokens = int(usage["prompt_tokens"])
    if not chunks:
        res.ttft = res.latency  # nothing visible arrived before the end


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict,
    body: dict,
    chat: bool,
    req: SampleRequest,
    index: int,
    t_start: float,
    timeout_s: float,
    retries: int = 0,
) -> RequestResult:
    """Send with up to `retries` retries (backoff 0.25 s doubling, max 4 s); never raises."""
    res = RequestResult(
        index=index, phase=req.phase, prompt_tokens=req.prompt_len, expected_output_tokens=req.output_len
    )
    t0 = time.perf_counter()
    res.send_time = t0 - t_start
    for attempt in range(retries + 1):
        try:
            await _attempt(session, url, headers, body, chat, res, t0, timeout_s)
            res.success, res.error = True, ""
            break
        except Exception as e:
            retryable = isinstance(e, (_Retryable, aiohttp.ClientError, asyncio.TimeoutError, OSError))
            res.error = f"{type(e).__name__}: {e}" if not isinstance(e, _Retryable) else str(e)
            res.latency = time.perf_counter() - t0
            if not retryable or attempt == retries:
                break
            res.attempt_errors.append(res.error)
            res.retries += 1
            await asyncio.sleep(min(4.0, 0.25 * 2**attempt))
    return res


# --- the run -------------------------------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> str:
    async with session.get(
        f"{base_url}/v1/models", headers=_headers(api_key), timeout=aiohttp.ClientTimeout(total=30)
    ) as resp:
        resp.raise_for_status()
        data = (await resp.json(content_type=None)).get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


def resolve_backend(backend: str | None, endpoint: str | None) -> tuple[str, str]:
    """--backend and --endpoint each default from the other; completions when neither is given."""
    if backend is None:
        backend = "openai-chat" if endpoint and endpoint.rstrip("/").endswith("chat/completions") else "openai"
    return backend, endpoint or ENDPOINTS[backend]


def make_phases(args: argparse.Namespace, text: bool) -> list[Phase]:
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    opts = DatasetOptions(
        name=args.dataset_name,
        path=args.dataset_path,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
        vocab_size=args.random_vocab_size,
        synthetic_input_len=args.synthetic_input_len,
        synthetic_output_len=args.synthetic_output_len,
        synthetic_max_input_len=args.synthetic_max_input_len,
        synthetic_max_output_len=args.synthetic_max_output_len,
        prefix_chat_system_len=args.prefix_chat_system_len,
        prefix_chat_users=args.prefix_chat_users,
        text=text,
        tokenizer=tok,
    )
    if args.phases:
        return parse_phases(args.phases, opts, args.request_rate, args.burstiness)
    return [Phase(args.request_rate, args.burstiness, num_prompts=args.num_prompts, dataset=opts, name="all")]


async def benchmark(args: argparse.Namespace) -> dict:
    """Run the load described by `args` and return the result dict (see `main` for its schema)."""
    backend, endpoint = resolve_backend(args.backend, args.endpoint)
    chat, base_url = backend == "openai-chat", args.base_url.rstrip("/")
    percentiles = tuple(float(p) for p in str(args.metric_percentiles).split(",") if p.strip())
    slos = parse_goodput(args.goodput)
    phases = make_phases(args, chat)
    if args.trace:
        requests = trace_requests(
            args.trace,
            args.trace_time_scale,
            args.trace_duration_s,
            args.trace_max_model_len,
            phases[0].dataset,
            args.seed,
        )
        end = requests[-1].arrival_s if requests else 0.0
        windows = [PhaseWindow(0, "trace", 0.0, end, len(requests), len(requests) / max(end, 1e-9), 1.0, "trace")]
    else:
        requests, windows = plan(phases, args.seed)
    headers = _headers(args.api_key)
    connector = aiohttp.TCPConnector(limit=0)  # the semaphore bounds concurrency; polls never queue
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        model = args.model or await fetch_model(session, base_url, args.api_key)
        bodies = [build_payload(r, model, chat, args.ignore_eos, args.temperature) for r in requests]
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")
        wall0, t_start = time.time(), time.perf_counter()
        poller = stop = poll_task = None
        if args.poll_topology:
            poller = TopologyPoller(session, base_url, wall0, args.admin_token, args.poll_interval)
            stop = asyncio.Event()
            poll_task = asyncio.create_task(poller.run(stop))

        tasks: list[asyncio.Task] = []

        async def one(i: int, req: SampleRequest) -> RequestResult:
            if req.after is not None:  # a chat's next turn: sent once the previous one has finished
                await asyncio.wait([tasks[req.after]])
            async with sem or contextlib.nullcontext():
                r = await send_request(
                    session,
                    base_url + endpoint,
                    headers,
                    bodies[i],
                    chat,
                    req,
                    i,
                    t_start,
                    args.timeout_s,
                    args.retry_failed,
                )
            bar.update(1)
            return r

        for i, req in enumerate(requests):
            if (delay := t_start + req.arrival_s - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t_start
        bar.close()
        if poller is not None:
            stop.set()
            await poll_task

    metrics = compute_metrics(results, duration, percentiles, slos)
    switches = poller.switches if poller else []
    timeline = args.timeline and str(
        plot_timeline(
            args.timeline,
            results,
            duration,
            switches,
            windows,
            f"{model} {endpoint}: {metrics['completed']} ok, {metrics['failed']} failed",
        )
    )
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": backend,
        "base_url": base_url,
        "endpoint": endpoint,
        "model": model,
        "start_time": wall0,
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "admin_token") and not callable(v)},
        **metrics,
        "phases": [asdict(w) | m for w, m in zip(windows, phase_metrics(results, len(windows), percentiles, slos))],
        "topology": poller.to_json() if poller else None,
        "timeline": timeline or None,
        # vLLM's flat per-request arrays (seconds), so its plotting scripts read this file too.
        "input_lens": [r.prompt_tokens for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "errors": [r.error for r in results],
        "requests": [asdict(r) for r in results],
    }


def _json_safe(x: Any) -> Any:
    """inf request rates are not JSON: write them as the string "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def report(result: dict, args: argparse.Namespace) -> str:
    """Summary block, per-phase blocks and the first distinct errors, as printed."""
    ps = tuple(float(p) for p in str(args.metric_percentiles).split(",") if p.strip())
    out = [format_summary(result, percentiles=ps, max_concurrency=args.max_concurrency)]
    if len(result["phases"]) > 1:
        for ph in result["phases"]:
            out.append(format_summary(ph, f"Phase {ph['index']}: {ph['name']} @ {ph['request_rate']:g} req/s", ps))
    if result["topology"] and result["topology"]["switches"]:
        out.append(
            "Topology switches: "
            + ", ".join(f"{s.get('from')}->{s.get('to')} at {s['time']:.2f} s" for s in result["topology"]["switches"])
        )
    errors = list(dict.fromkeys(e for e in result["errors"] if e))[:3]
    if errors:
        out.append("First errors:\n  " + "\n  ".join(errors))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when at least one request completed, 1 when none did, 2 on a usage or connection error.

    --save-result JSON: date, backend, base_url, endpoint, model, start_time (unix), config (the flags), the
    metrics (duration, completed, failed, retried_requests, total_retries, total_input_tokens,
    total_output_tokens, request_throughput, output_throughput, total_token_throughput, [goodput_slos_ms,
    good_requests, request_goodput], {mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms), phases (each window:
    index, name, start_s, end_s, num_requests, request_rate, burstiness, dataset, first_send_s, last_end_s, plus
    the same metrics), topology (source, samples [{time, topology}], switches [{time, unix_time, from, to,
    pause_s?, wall_s?, mode?, source}] or null), timeline (PNG path or null), vLLM's
    input_lens/output_lens/ttfts/itls/errors, and requests (RequestResult fields).
    Times in results are seconds from the run start.
    """
    parser = argparse.ArgumentParser(prog="remp bench serve", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    return run_cli(parser.parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    """Run, print, save; for a CLI hook: `add_cli_args(p); p.set_defaults(func=run_cli)`. Exit codes as main."""
    try:
        result = asyncio.run(benchmark(args))
    except (ValueError, FileNotFoundError, json.JSONDecodeError, aiohttp.ClientError, OSError) as e:
        print(f"remp bench serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(report(result, args))
    if result["timeline"]:
        print(f"Timeline: {result['timeline']}")
    if args.save_result:
        rate = "phases" if args.phases else "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
        name = (
            args.result_filename
            or f"remp-bench-{result['backend']}-{rate}qps-{Path(result['model']).name}-{result['date']}.json"
        )
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(result), indent=1))
        print(f"Result: {path}")
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
