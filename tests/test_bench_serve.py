"""remp bench serve: metric arithmetic on synthetic timings, arrival processes, datasets, and end-to-end runs
against a tiny fake OpenAI-compatible streaming server on 127.0.0.1 (no model, a few seconds in all)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from remp.bench import serve
from remp.bench.datasets import (
    DatasetOptions,
    arrival_offsets,
    arrivals_for_duration,
    file_requests,
    intervals,
    parse_phases,
    plan,
    prefix_chat_requests,
    random_requests,
    synthetic_chat_requests,
)
from remp.bench.metrics import RequestResult, compute_metrics, meets_slos, parse_goodput, phase_metrics, tpot
from remp.bench.timeline import parse_topology_gauges, tokens_per_second

pytestmark = pytest.mark.timeout(60)


def _req(i, send, ttft, itl, tokens, prompt=10, ok=True, phase=0):
    """A finished request: `tokens` output tokens over one chunk each, latency = ttft + sum(itl)."""
    return RequestResult(
        index=i,
        phase=phase,
        success=ok,
        send_time=send,
        ttft=ttft,
        latency=ttft + sum(itl),
        itl=list(itl),
        prompt_tokens=prompt,
        output_tokens=tokens,
        error="" if ok else "boom",
    )


# --- metrics -------------------------------------------------------------------------------------------------


def test_tpot_is_decode_time_over_tokens_after_the_first():
    r = _req(0, 0.0, 0.5, [0.1, 0.2, 0.3], 4)  # e2e 1.1 s
    assert tpot(r) == pytest.approx((1.1 - 0.5) / 3)
    assert tpot(_req(1, 0.0, 0.5, [], 1)) is None  # one token: no TPOT
    r.output_tokens = 7  # usage says more tokens than chunks: tokens win
    assert tpot(r) == pytest.approx(0.6 / 6)


def test_compute_metrics_on_synthetic_timings():
    rs = [
        _req(0, 0.0, 0.100, [0.01, 0.03], 3, prompt=5),
        _req(1, 1.0, 0.300, [0.02, 0.02, 0.02, 0.02], 5, prompt=7),
        _req(2, 2.0, 0.200, [], 1, prompt=9),  # 1 token: in TTFT/E2EL, not in TPOT
        _req(3, 2.5, 9.0, [1.0], 2, ok=False),
    ]  # failed: excluded everywhere
    m = compute_metrics(rs, duration_s=4.0, percentiles=(50, 90, 99))
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (21, 9)
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(9 / 4)
    assert m["total_token_throughput"] == pytest.approx(30 / 4)
    ttfts = np.array([100.0, 300.0, 200.0])
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["std_ttft_ms"] == pytest.approx(ttfts.std())
    assert m["p90_ttft_ms"] == pytest.approx(280.0)  # numpy linear interpolation
    assert m["p99_ttft_ms"] == pytest.approx(298.0)
    tpots = [(0.14 - 0.1) / 2 * 1000, (0.38 - 0.3) / 4 * 1000]
    assert m["mean_tpot_ms"] == pytest.approx(np.mean(tpots))
    itls = [10, 30, 20, 20, 20, 20]
    assert m["mean_itl_ms"] == pytest.approx(np.mean(itls))
    assert m["p99_itl_ms"] == pytest.approx(np.percentile(itls, 99))
    assert m["median_e2el_ms"] == pytest.approx(200.0)  # e2els 140, 380, 200
    assert m["p50_e2el_ms"] == m["median_e2el_ms"]
    assert "request_goodput" not in m


def test_goodput_requires_every_slo():
    fast = _req(0, 0, 0.05, [0.01] * 9, 10)  # ttft 50 ms, tpot 10 ms, e2el 140 ms
    slow_first = _req(1, 0, 0.50, [0.01] * 9, 10)  # ttft 500 ms
    slow_decode = _req(2, 0, 0.05, [0.08] * 9, 10)  # tpot 80 ms
    single = _req(3, 0, 0.05, [], 1)  # tpot counts as 0
    failed = _req(4, 0, 0.01, [0.001], 2, ok=False)
    slos = parse_goodput(["ttft:100", "tpot:20"])
    assert slos == {"ttft": 100.0, "tpot": 20.0}
    assert [meets_slos(r, slos) for r in (fast, slow_first, slow_decode, single, failed)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    m = compute_metrics([fast, slow_first, slow_decode, single, failed], 2.0, slos_ms=slos)
    assert m["good_requests"] == 2 and m["request_goodput"] == pytest.approx(1.0)
    assert compute_metrics([fast, slow_decode], 1.0, slos_ms={"e2el": 200})["good_requests"] == 1
    assert parse_goodput(["ttft:100,e2el:900"]) == {"ttft": 100.0, "e2el": 900.0}
    with pytest.raises(ValueError):
        parse_goodput(["latency:5"])


def test_phase_metrics_split_and_time_their_own_window():
    rs = [
        _req(0, 0.0, 0.1, [0.1], 2, phase=0),
        _req(1, 0.5, 0.1, [0.4], 2, phase=0),
        _req(2, 10.0, 0.1, [0.1, 0.1, 0.1], 4, phase=1),
    ]
    p0, p1 = phase_metrics(rs, 2)
    assert p0["completed"] == 2 and p0["duration"] == pytest.approx(1.0)  # 0.0 .. 0.5 + 0.5
    assert p1["completed"] == 1 and p1["duration"] == pytest.approx(0.4)
    assert p1["output_throughput"] == pytest.approx(4 / 0.4)


def test_tokens_per_second_bins_chunk_arrivals():
    rs = [
        _req(0, 0.0, 0.5, [0.2, 0.2, 0.2, 0.2], 5),  # chunks at 0.5 0.7 0.9 1.1 1.3
        _req(1, 1.0, 1.2, [0.1], 4),
    ]  # 2 chunks (2 tokens each) at 2.2 2.3
    t, tps = tokens_per_second(rs, 3.0)
    assert t.tolist() == [0, 1, 2] and tps.tolist() == pytest.approx([3, 2, 4])


def test_parse_topology_gauges():
    text = (
        "# HELP remp:tensor_parallel_size Current tensor parallel size\n# TYPE remp:tensor_parallel_size gauge\n"
        'remp:tensor_parallel_size{model_name="m"} 2.0\nremp:pipeline_parallel_size{model_name="m"} 4.0\n'
        'remp:num_requests_running{model_name="m"} 3.0\n'
    )
    assert parse_topology_gauges(text) == "TP2xPP4"
    assert parse_topology_gauges("remp:tensor_parallel_size 1\n") is None


# --- arrivals and datasets -----------------------------------------------------------------------------------


def test_poisson_mean_rate_with_fixed_seed():
    gaps = intervals(4000, 20.0, 1.0, np.random.default_rng(0))
    assert 1 / gaps.mean() == pytest.approx(20.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential: CV 1
    offsets, span = arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0))
    assert offsets.tolist() == [0] * 5 and span == 0


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_cv(burstiness):
    gaps = intervals(20000, 10.0, burstiness, np.random.default_rng(1))
    assert 1 / gaps.mean() == pytest.approx(10.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_arrivals_for_duration_stay_inside():
    t = arrivals_for_duration(30.0, 5.0, 1.0, np.random.default_rng(2))
    assert t[0] == 0 and (np.diff(t) >= 0).all() and t[-1] < 30
    assert len(t) == pytest.approx(150, rel=0.2)
    with pytest.raises(ValueError):
        arrivals_for_duration(1.0, math.inf, 1.0, np.random.default_rng(0))


def test_phases_concatenate_on_one_clock():
    base = DatasetOptions(random_input_len=8, random_output_len=4)
    spec = [
        {"num_prompts": 5, "request_rate": "inf"},
        {"duration_s": 4, "request_rate": 10, "input_len": 32, "output_len": 16},
        {"num_prompts": 20, "request_rate": 4, "burstiness": 0.5, "dataset": "synthetic-chat"},
    ]
    phases = parse_phases(json.dumps(spec), base)
    reqs, windows = plan(phases, seed=3)
    assert [w.start_s for w in windows[:3]] == [0.0, 0.0, 4.0]
    assert windows[1].end_s == 4.0 and windows[2].end_s > 4.0
    assert [r.phase for r in reqs] == sorted(r.phase for r in reqs)
    arrivals = [r.arrival_s for r in reqs]
    assert arrivals == sorted(arrivals)
    p0, p1, p2 = ([r for r in reqs if r.phase == k] for k in range(3))
    assert len(p0) == 5 and all(r.arrival_s == 0 and r.prompt_len == 8 and r.output_len == 4 for r in p0)
    assert 20 <= len(p1) <= 70 and all(0 <= r.arrival_s < 4 and r.prompt_len == 32 for r in p1)
    assert len(p2) == 20 and p2[0].arrival_s == 4.0
    assert plan(phases, seed=3)[0] == reqs  # reproducible
    with pytest.raises(ValueError):
        parse_phases('[{"num_prompts": 1, "rate": 3}]', base)
    with pytest.raises(ValueError):
        parse_phases('[{"num_prompts": 1, "duration_s": 3}]', base)


def test_random_dataset_lengths_and_ids():
    fixed = random_requests(50, DatasetOptions(random_input_len=64, random_output_len=16, vocab_size=500), seed=0)
    assert all(r.prompt_len == len(r.prompt) == 64 and r.output_len == 16 for r in fixed)
    assert all(100 <= t < 500 for r in fixed for t in r.prompt)
    ranged = random_requests(400, DatasetOptions(random_input_len=100, random_output_len=50, range_ratio=0.5), 1)
    ins, outs = [r.prompt_len for r in ranged], [r.output_len for r in ranged]
    assert min(ins) >= 50 and max(ins) <= 150 and min(outs) >= 25 and max(outs) <= 75
    assert min(ins) < 60 and max(ins) > 140  # spread over the whole range
    chat = random_requests(3, DatasetOptions(random_input_len=20, text=True), 0)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 20 for r in chat)


def test_synthetic_chat_is_long_tailed_and_seeded():
    opts = DatasetOptions(name="synthetic-chat", synthetic_max_input_len=2048, synthetic_max_output_len=1024)
    a = synthetic_chat_requests(2000, opts, seed=7)
    assert a == synthetic_chat_requests(2000, opts, seed=7)
    assert a != synthetic_chat_requests(2000, opts, seed=8)
    ins, outs = np.array([r.prompt_len for r in a]), np.array([r.output_len for r in a])
    assert np.median(ins) == pytest.approx(200, rel=0.15) and np.median(outs) == pytest.approx(150, rel=0.15)
    assert ins.mean() > 1.3 * np.median(ins)  # long right tail
    assert np.percentile(ins, 99) > 5 * np.median(ins)
    assert ins.max() <= 2048 and outs.max() <= 1024 and ins.min() >= 4 and outs.min() >= 1


def test_file_datasets(tmp_path):
    sg = tmp_path / "sg.json"
    sg.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "hello there"},
                        {"from": "gpt", "value": "one two three four"},
                    ]
                },
                {"conversations": [{"from": "gpt", "value": "orphan"}]},
            ]
        )
    )
    rs = file_requests(3, DatasetOptions(name="sharegpt", path=str(sg)), 0)
    assert [(r.prompt, r.output_len) for r in rs] == [("hello there", 5)] * 3  # round(4 words * 1.3)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a b c", "max_tokens": 7}\n{"prompt": [5, 6, 7, 8]}\n')
    rs = file_requests(2, DatasetOptions(name="jsonl", path=str(jl), random_output_len=9), 0)
    assert sorted((r.prompt_len, r.output_len) for r in rs) == [(4, 7), (4, 9)]


def test_prefix_chat_turns_extend_their_user_history_behind_one_system_prompt():
    opts = DatasetOptions(
        name="prefix-chat", random_input_len=5, random_output_len=3, prefix_chat_system_len=20, prefix_chat_users=4
    )
    rs = prefix_chat_requests(10, opts, seed=3)  # 4 users: turns 1 and 2 in full, then 2 users' third turn
    system = rs[0].prompt[:20]
    assert all(r.prompt[:20] == system for r in rs)
    assert len({tuple(r.prompt[20:25]) for r in rs[:4]}) == 4  # each user writes their own first message
    for k, r in enumerate(rs):
        turn = k // 4
        assert r.prompt_len == len(r.prompt) == 20 + turn * (5 + 3) + 5 and r.output_len == 3
        if turn == 0:
            assert r.after is None
        else:  # the same user's previous prompt, then a 3-token answer, then the new message
            prev = rs[k - 4]
            assert r.after == k - 4 and r.prompt[: prev.prompt_len] == prev.prompt
    assert rs == prefix_chat_requests(10, opts, seed=3) and rs != prefix_chat_requests(10, opts, seed=4)
    ranged = prefix_chat_requests(
        40, DatasetOptions(random_input_len=10, random_output_len=4, range_ratio=0.5, prefix_chat_users=2), 0
    )
    assert all(r.prompt[: p.prompt_len] == p.prompt for r, p in zip(ranged[2:], ranged))
    assert {r.output_len for r in ranged} == {2, 3, 4, 5, 6}
    assert {r.prompt_len - p.prompt_len - p.output_len for r, p in zip(ranged[2:], ranged)} == set(range(5, 16))
    with pytest.raises(ValueError, match="completions"):
        prefix_chat_requests(2, DatasetOptions(text=True), 0)
    phases = parse_phases('[{"num_prompts": 3, "dataset": "random"}, {"num_prompts": 8}]', opts)
    requests, _ = plan(phases, seed=0)  # the second phase's `after` points into the run, past the first phase
    assert [r.after for r in requests[3:]] == [None] * 4 + [3, 4, 5, 6]


# --- end to end against a fake server ------------------------------------------------------------------------


class FakeServer:
    """OpenAI-compatible streaming server on 127.0.0.1 in its own thread: every request streams `max_tokens`
    chunks `delay_s` apart; after `switch_after` completion requests its topology flips TP4xPP1 -> TP2xPP2.
    `fail_every` k: every k-th request gets HTTP 500. `admin=False`: no admin API, only /metrics gauges."""

    def __init__(self, delay_s=0.002, switch_after=10, fail_every=0, admin=True, fail_first_attempts=0):
        self.delay_s, self.switch_after, self.fail_every, self.admin = delay_s, switch_after, fail_every, admin
        self.fail_first_attempts = fail_first_attempts
        self.count, self.topology, self.switches, self.bodies = 0, "TP4xPP1", [], []
        self.switching_to = None  # as /admin/topology reports a switch under way
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.count += 1
        n = self.count
        if n == self.switch_after:
            self.switches.append(
                {"time": time.time(), "from": self.topology, "to": "TP2xPP2", "pause_s": 0.05, "wall_s": 0.1}
            )
            self.topology = "TP2xPP2"
        if (self.fail_every and n % self.fail_every == 0) or n <= self.fail_first_attempts:
            return web.json_response({"error": {"message": "injected"}}, status=500)
        chat = "messages" in body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        tokens = body.get("max_completion_tokens" if chat else "max_tokens")
        for i in range(tokens):
            await asyncio.sleep(self.delay_s)
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": len(body["prompt"]) if not chat else 3, "completion_tokens": tokens}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return resp

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def topology_handler(self, request):
        if not self.admin:
            return web.json_response({"error": "off"}, status=404)
        if request.headers.get("Authorization") != "Bearer secret":
            return web.json_response({"error": "auth"}, status=401)
        tp, pp = (int(x) for x in self.topology[2:].split("xPP"))
        return web.json_response(
            {
                "topology": self.topology,
                "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp,
                "switches": self.switches,
                "switching_to": self.switching_to,
            }
        )

    async def metrics(self, request):
        tp, pp = (int(x) for x in self.topology[2:].split("xPP"))
        return web.Response(
            text=f'remp:tensor_parallel_size{{model_name="fake"}} {tp}.0\n'
            f'remp:pipeline_parallel_size{{model_name="fake"}} {pp}.0\n'
        )

    def __enter__(self):
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.completions),
                web.get("/v1/models", self.models),
                web.get("/admin/topology", self.topology_handler),
                web.get("/metrics", self.metrics),
            ]
        )
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.SockSite(self.runner, self.sock).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_poller_waits_for_the_history_of_a_switch_under_way():
    """The server's topology changes at the cut-over, a little before the switch enters its history: a poll in
    between must not count a second, history-less switch."""
    import aiohttp

    from remp.bench.timeline import TopologyPoller

    async def polls(server):
        async with aiohttp.ClientSession() as session:
            poller = TopologyPoller(session, server.url, time.time() - 1, admin_token="secret")
            await poller.poll_once()  # TP4xPP1, nothing switched
            server.topology, server.switching_to = "TP2xPP2", "TP2xPP2"
            await poller.poll_once()  # the new topology, its history entry not yet there
            server.switches.append({"time": time.time(), "from": "TP4xPP1", "to": "TP2xPP2"})
            server.switching_to = None
            await poller.poll_once()
            return poller.switches

    with FakeServer() as server:
        switches = asyncio.run(polls(server))
    assert [(s["from"], s["to"], s["source"]) for s in switches] == [("TP4xPP1", "TP2xPP2", "admin")]


def _run(argv, tmp_path):
    rc = serve.main(
        [*argv, "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    )
    return rc, json.loads((tmp_path / "r.json").read_text())


def test_end_to_end_phases_timeline_and_switch(tmp_path, capsys):
    png = tmp_path / "t.png"
    phases = [
        {"num_prompts": 12, "request_rate": "inf", "input_len": 16, "output_len": 8},
        {"num_prompts": 12, "request_rate": 40, "input_len": 8, "output_len": 5},
    ]
    with FakeServer(switch_after=14) as srv:
        rc, res = _run(
            [
                "--base-url",
                srv.url,
                "--phases",
                json.dumps(phases),
                "--max-concurrency",
                "6",
                "--ignore-eos",
                "--goodput",
                "ttft:5000",
                "tpot:1000",
                "--poll-topology",
                "--admin-token",
                "secret",
                "--timeline",
                str(png),
            ],
            tmp_path,
        )
    assert rc == 0
    assert (res["completed"], res["failed"], res["model"]) == (24, 0, "fake-model")
    assert res["total_output_tokens"] == 12 * 8 + 12 * 5
    assert res["total_input_tokens"] == 12 * 16 + 12 * 8
    assert res["good_requests"] == 24 and res["p99_itl_ms"] > 0 and res["mean_tpot_ms"] > 0
    assert [p["completed"] for p in res["phases"]] == [12, 12]
    assert [p["total_output_tokens"] for p in res["phases"]] == [96, 60]
    assert all(len(r["itl"]) == r["output_tokens"] - 1 for r in res["requests"])
    b = srv.bodies[0]
    assert b["stream"] and b["ignore_eos"] and b["temperature"] == 0 and b["stream_options"]["include_usage"]
    assert isinstance(b["prompt"], list) and b["model"] == "fake-model"
    sw = res["topology"]["switches"]
    assert len(sw) == 1 and (sw[0]["from"], sw[0]["to"], sw[0]["source"]) == ("TP4xPP1", "TP2xPP2", "admin")
    assert 0 <= sw[0]["time"] <= res["duration"]
    assert res["timeline"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Phase 1" in out and "TP4xPP1->TP2xPP2" in out


def test_metrics_fallback_detects_switch_and_chat_endpoint(tmp_path):
    with FakeServer(switch_after=4, admin=False) as srv:
        rc, res = _run(
            [
                "--base-url",
                srv.url,
                "--endpoint",
                "/v1/chat/completions",
                "--num-prompts",
                "8",
                "--random-input-len",
                "6",
                "--random-output-len",
                "3",
                "--max-concurrency",
                "2",
                "--poll-topology",
                "--admin-token",
                "secret",
            ],
            tmp_path,
        )
    assert rc == 0 and res["backend"] == "openai-chat" and res["completed"] == 8
    assert srv.bodies[0]["messages"][0]["content"].count(" ") == 5 and srv.bodies[0]["max_completion_tokens"] == 3
    assert res["topology"]["source"] == "metrics"
    assert [(s["from"], s["to"], s["source"]) for s in res["topology"]["switches"]] == [("TP4xPP1", "TP2xPP2", "poll")]


def test_prefix_chat_sends_each_turn_after_its_users_previous_one(tmp_path):
    args = ["--dataset-name", "prefix-chat", "--prefix-chat-system-len", "8", "--prefix-chat-users", "3"]
    args += ["--num-prompts", "9", "--random-input-len", "2", "--random-output-len", "4", "--ignore-eos"]
    with FakeServer(delay_s=0.01, switch_after=0) as srv:
        rc, res = _run(["--base-url", srv.url, *args], tmp_path)
    assert rc == 0 and res["completed"] == 9
    reqs = res["requests"]
    for k in range(3, 9):  # sent only once the same user's previous turn had its whole answer
        assert reqs[k]["send_time"] >= reqs[k - 3]["send_time"] + reqs[k - 3]["latency"]
    assert sorted(len(b["prompt"]) for b in srv.bodies) == [10] * 3 + [16] * 3 + [22] * 3


def test_http_errors_are_failures_not_crashes(tmp_path):
    with FakeServer(fail_every=3) as srv:
        rc, res = _run(
            [
                "--base-url",
                srv.url,
                "--model",
                "m",
                "--num-prompts",
                "9",
                "--random-input-len",
                "4",
                "--random-output-len",
                "2",
                "--request-rate",
                "200",
                "--seed",
                "1",
            ],
            tmp_path,
        )
    assert rc == 0 and (res["completed"], res["failed"]) == (6, 3)
    assert sum("HTTP 500" in e for e in res["errors"]) == 3
    assert res["total_output_tokens"] == 12


def test_retries_recover_and_are_counted(tmp_path):
    with FakeServer(fail_first_attempts=2) as srv:
        rc, res = _run(
            [
                "--base-url",
                srv.url,
                "--num-prompts",
                "3",
                "--random-input-len",
                "4",
                "--random-output-len",
                "2",
                "--max-concurrency",
                "1",
                "--retry-failed",
                "2",
            ],
            tmp_path,
        )
    assert rc == 0 and (res["completed"], res["failed"]) == (3, 0)
    assert (res["retried_requests"], res["total_retries"]) == (1, 2)
    assert res["requests"][0]["attempt_errors"][0].startswith("HTTP 500")


def test_unreachable_server(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    url = f"http://127.0.0.1:{port}"
    assert serve.main(["--base-url", url, "--disable-tqdm"]) == 2  # model lookup fails: usage error
    rc, res = _run(
        [
            "--base-url",
            url,
            "--model",
            "m",
            "--num-prompts",
            "3",
            "--random-input-len",
            "4",
            "--random-output-len",
            "2",
        ],
        tmp_path,
    )
    assert rc == 1 and res["failed"] == 3 and all("Connect" in e for e in res["errors"])


def test_trace_replay_sends_its_arrivals_and_lengths(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,12,3\n0.4,20,5\n0.8,9,2\n5,9,2\n")
    with FakeServer() as srv:
        args = ["--base-url", srv.url, "--trace", str(trace), "--trace-time-scale", "0.5", "--trace-duration-s", "1"]
        rc, res = _run([*args, "--ignore-eos"], tmp_path)
    assert rc == 0 and res["completed"] == 3  # the 4th arrives at 2.5 s on the scaled clock: cut
    assert sorted(len(b["prompt"]) for b in srv.bodies) == [9, 12, 20]
    assert sorted(b["max_tokens"] for b in srv.bodies) == [2, 3, 5]
    sends = sorted(r["send_time"] for r in res["requests"])
    assert sends[1] == pytest.approx(0.2, abs=0.1) and sends[2] == pytest.approx(0.4, abs=0.1)
