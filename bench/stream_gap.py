"""What a streaming client sees during a live topology switch and during a restart.

    python bench/stream_gap.py [--model PATH] [--dtype auto] [--streams 4] [--tokens 600]

Starts `remp serve` at TP4 (4 workers), opens several streaming completions, switches the topology through the
admin API while they stream: two live switches, one stop-the-world, then mode=restart (the baseline: stop,
reload, recompute).
Reports for each event the longest gap between two streamed tokens seen by any client next to the server's
reported pause, and whether every stream completed. Saves bench/results/stream_gap.json.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

import openai

from remp.bench.results import save_result
from remp.tools.launch import launched, remp_serve_command


def admin(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/admin/reconfigure",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json", "authorization": "Bearer bench"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run_event(url: str, streams: int, tokens: int, event: dict, delay_s: float) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []

    def stream(i: int) -> None:
        try:
            for chunk in client.completions.create(
                model="m",
                prompt=f"Story number {i}: once upon a time",
                max_tokens=tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            ):
                if chunk.choices and chunk.choices[0].text:
                    arrivals[i].append(time.perf_counter())
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(delay_s)
    t0 = time.perf_counter()
    report = admin(url, event)
    t1 = time.perf_counter()
    for t in threads:
        t.join()
    gaps = [b - a for arr in arrivals for a, b in zip(arr, arr[1:])]
    during = [b - a for arr in arrivals for a, b in zip(arr, arr[1:]) if b >= t0 and a <= t1]
    normal = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    return {
        "event": event,
        "reported_wall_s": report["wall_s"],
        "reported_pause_s": report["pause_s"],
        "max_gap_during_s": max(during, default=0.0),
        "median_gap_s": normal,
        "streams_completed": sum(len(a) > 0 for a in arrivals) - len(errors),
        "streams": streams,
        "errors": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=600, help="per stream: long enough to outlast a live switch")
    a = p.parse_args()
    args = ([a.model] if a.model else []) + [
        "--dtype",
        a.dtype,
        "-tp",
        "4",
        "--admin-token",
        "bench",
        "--served-model-name",
        "m",
        "--max-model-len",
        "1024",
    ]
    results = []
    with launched(remp_serve_command(*args, "--port", "0"), timeout_s=600) as server:
        url = server.url
        for event in [
            {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
            {"tensor_parallel_size": 1, "pipeline_parallel_size": 4},
            {"tensor_parallel_size": 4, "pipeline_parallel_size": 1, "mode": "stop"},
            {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "mode": "restart"},
        ]:
            r = run_event(url, a.streams, a.tokens, event, delay_s=3.0)
            print(json.dumps(r), flush=True)
            results.append(r)
    save_result({"model": a.model or "smollm2-135m", "results": results}, "stream_gap", dtype=a.dtype)
    print(
        "| event | reported wall s | reported pause s | longest client gap s | median gap s | longest / median "
        "| streams ok |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        e = r["event"]
        name = f"{e.get('mode', 'live')} -> TP{e['tensor_parallel_size']}xPP{e['pipeline_parallel_size']}"
        ratio = r["max_gap_during_s"] / r["median_gap_s"] if r["median_gap_s"] else float("nan")
        print(
            f"| {name} | {r['reported_wall_s']:.2f} | {r['reported_pause_s']:.3f} | {r['max_gap_during_s']:.3f} "
            f"| {r['median_gap_s']:.3f} | {ratio:.1f}x | {r['streams_completed']}/{r['streams']} |"
        )


if __name__ == "__main__":
    main()
