"""`remp serve` against the official openai client: completions and chat, streaming and not, usage, greedy
equality with the offline LLM, OpenAI-style errors, auth, and a live topology switch under streaming load."""

import json
import re
import threading

import openai
import pytest

from remp import LLM, SamplingParams
from tests.server_utils import get, post, remp_server, worker_pids

PROMPTS = ["hello world", "abc", "The quick brown fox", "1 2 3 4"]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with remp_server(
        str(tiny_llama),
        "--dtype",
        "float64",
        "-tp",
        "2",
        "-pp",
        "2",
        "--admin-token",
        "adm",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "256",
    ) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    with LLM(str(tiny_llama), dtype="float64", max_model_len=256) as llm:
        yield llm


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_equals_offline_and_usage(client, offline):
    for prompt in PROMPTS:
        ref = offline.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        r = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.choices[0].text == ref.outputs[0].text
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == 12
        assert r.choices[0].finish_reason == "length"


def test_streaming_completion_and_usage(client, offline):
    ref = offline.generate("abc", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="abc",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_streaming_and_not(client, offline):
    msgs = [{"role": "user", "content": "hi there"}]
    ref = offline.chat(msgs, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    r = client.chat.completions.create(
        model="tiny", messages=msgs, max_completion_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == ref.outputs[0].text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.outputs[0].text


def test_seeded_sampling_is_reproducible(client):
    a, b = (
        client.completions.create(model="tiny", prompt="xyz", max_tokens=8, temperature=1.0, seed=3) for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 3 and all(x <= 0 for x in lp.token_logprobs)
    c = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(c.choices[0].logprobs.content) == 2


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"prompt": "a" * 400, "max_tokens": 2}, 400, "max_model_len"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"prompt": "a", "top_p": 7}, 400, "top_p"),
        ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": 12}, 400, "prompt"),
        ({"prompt": "a", "model": "gpt-17"}, 404, "does not exist"),
        ({"prompt": "a", "suffix": "b"}, 400, "`suffix` is not supported by remp"),
        ({"prompt": "a", "no_such_field": 1}, 400, "unknown field `no_such_field`"),
        ({"prompt": "a", "n": 2, "best_of": 1}, 400, "best_of"),
        ({"prompt": "a", "guided_regex": "(", "max_tokens": 2}, 400, "guided_regex"),
        ({"prompt": "a", "logit_bias": {"999999": 1.0}}, 400, "logit_bias"),
    ],
)
def test_bad_requests(server, body, status, needle):
    code, err = post(server, "/v1/completions", body)
    assert code == status and needle in json.dumps(err["error"])


def test_malformed_json_and_bad_chat(server):
    code, err = post(server, "/v1/completions", None, raw=b'{"prompt": "a",')
    assert code == 400 and "malformed JSON" in err["error"]["message"]
    code, err = post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert code == 400


def test_admin_auth_and_refused_switch(server, client):
    assert get(server, "/admin/topology")[0] == 401
    assert get(server, "/admin/topology", token="wrong")[0] == 403
    code, body = get(server, "/admin/topology", token="adm")
    assert code == 200 and json.loads(body)["topology"] == "TP2xPP2"
    code, err = post(server, "/admin/reconfigure", {"tensor_parallel_size": 5, "pipeline_parallel_size": 1}, "adm")
    assert code == 400 and "still serving TP2xPP2" in err["error"]["message"]
    assert "pool has at most 4" in err["error"]["message"]
    code, err = post(server, "/admin/reconfigure", {"tensor_parallel_size": 2}, "adm")
    assert code == 400
    assert post(server, "/admin/reconfigure", {"tensor_parallel_size": 4, "pipeline_parallel_size": 1}, "x")[0] == 403
    # still serving, correctly
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    assert len(r.choices[0].text) > 0 and get(server, "/health")[0] == 200


def test_metrics(server, client):
    client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    code, text = get(server, "/metrics")
    for name in (
        "remp:num_requests_running",
        "remp:kv_cache_usage_perc",
        "remp:generation_tokens_total",
        "remp:time_to_first_token_seconds_bucket",
        "remp:e2e_request_latency_seconds_count",
        "remp:tensor_parallel_size",
        "remp:data_parallel_size",
        "remp:topology_switches_total",
        "remp:prefix_cache_queries_total",
        "remp:prefix_cache_hits_total",
        'remp:replica_kv_cache_usage_perc{model_name="tiny",replica="0"}',
        "remp:inter_token_latency_seconds_bucket",
        "remp:request_queue_time_seconds_count",
        "remp:request_prefill_time_seconds_count",
        "remp:request_decode_time_seconds_count",
        "remp:num_preemptions_total",
    ):
        assert name in text


def metric_sum(url: str, name: str, **labels: str) -> float:
    lines = get(url, "/metrics")[1].splitlines()
    match = [ln for ln in lines if ln.startswith(name) and all(f'{k}="{v}"' in ln for k, v in labels.items())]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in match)


def test_live_switches_while_streaming(server, client, offline):
    """Six concurrent streams; three live switches while they stream, the second shrinking the pool to two
    workers and the third growing it back; every stream completes without error and equals a run without
    switches; /metrics counts the switches and their pauses, and the pool's size and generations."""
    prompts = ["alpha beta", "gamma", "delta epsilon zeta", "eta", "theta iota", "kappa lambda mu"]
    refs = {
        p: o.outputs[0].text
        for p, o in zip(
            prompts, offline.generate(prompts, SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
        )
    }
    live_before = metric_sum(server, "remp:topology_switches_total", mode="live")
    pauses_before = metric_sum(server, "remp:topology_switch_pause_seconds_count")
    generation_before = metric_sum(server, "remp:pool_generation")
    results, errors = {}, []

    def stream(p):
        try:
            chunks = client.completions.create(
                model="tiny", prompt=p, max_tokens=150, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            results[p] = "".join(c.choices[0].text for c in chunks if c.choices)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    reports, pools = [], []
    for tp, pp in [(4, 1), (1, 2), (2, 2)]:
        code, rep = post(
            server, "/admin/reconfigure", {"tensor_parallel_size": tp, "pipeline_parallel_size": pp}, "adm"
        )
        assert code == 200, rep
        reports.append(rep)
        pools.append(metric_sum(server, "remp:num_workers"))
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert results == refs
    assert all(r["mode"] == "live" and r["pause_s"] < r["wall_s"] for r in reports)
    assert sum(r["kv_blocks_moved"] > 0 for r in reports) >= 1
    assert metric_sum(server, "remp:topology_switches_total", mode="live") == live_before + 3
    assert metric_sum(server, "remp:topology_switch_pause_seconds_count") == pauses_before + 3
    assert pools == [4, 2, 4] and [r["pool_size"] for r in reports] == [4, 2, 4]
    assert metric_sum(server, "remp:pool_generation") == generation_before + 2  # shrink, then grow
    topo = json.loads(get(server, "/admin/topology", token="adm")[1])
    assert len(topo["switches"]) >= 3 and topo["topology"] == "TP2xPP2"
    assert topo["num_workers"] == topo["max_workers"] == 4


def test_chat_streams_through_data_parallel_switches(server, client, offline):
    """The openai client streams chats while the topology goes TP4 -> DP2xTP2 -> DP4xTP1 -> TP4 (and back to
    where the module's server started): no stream errs, every one equals a run without switches."""
    prompts = ["one two", "three", "four five six", "seven"]
    chat = [[{"role": "user", "content": p}] for p in prompts]
    refs = [
        o.outputs[0].text for o in offline.chat(chat, SamplingParams(max_tokens=120, temperature=0, ignore_eos=True))
    ]
    results, errors = {}, []

    def stream(i):
        try:
            chunks = client.chat.completions.create(
                model="tiny", messages=chat[i], max_tokens=120, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    shapes = []
    for dp, tp, pp in [(1, 4, 1), (2, 2, 1), (4, 1, 1), (1, 4, 1), (1, 2, 2)]:
        body = {"data_parallel_size": dp, "tensor_parallel_size": tp, "pipeline_parallel_size": pp}
        code, rep = post(server, "/admin/reconfigure", body, "adm")
        assert code == 200, rep
        shapes.append(rep["new_topology"])
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [results[i] for i in range(len(prompts))] == refs
    assert shapes == ["TP4xPP1", "DP2xTP2xPP1", "DP4xTP1xPP1", "TP4xPP1", "TP2xPP2"]
    topo = json.loads(get(server, "/admin/topology", token="adm")[1])
    assert topo["data_parallel_size"] == 1 and len(topo["replicas"]) == 1
    assert metric_sum(server, "remp:data_parallel_size") == 1


def test_bench_serve_against_live_server(server, tmp_path):
    """`remp bench serve` end to end on the live server, with a switch during the run marked on the timeline."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "remp",
        "bench",
        "serve",
        "--base-url",
        server,
        "--num-prompts",
        "12",
        "--random-input-len",
        "16",
        "--random-output-len",
        "80",
        "--random-vocab-size",
        "256",
        "--ignore-eos",
        "--request-rate",
        "20",
        "--save-result",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "r.json",
        "--disable-tqdm",
        "--poll-topology",
        "--admin-token",
        "adm",
        "--timeline",
        str(tmp_path / "t.png"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.monotonic() + 60
    running = re.compile(r"^remp:num_requests_running\{[^}]*\} ([1-9]\d*)\.0$", re.M)
    while not running.search(get(server, "/metrics")[1]) and time.monotonic() < deadline:
        time.sleep(0.05)  # switch once the load is running, so that the switch falls inside the run
    # stop-the-world: done in a fraction of the run (a live pre-copy could outlast this small load)
    switch = {"tensor_parallel_size": 4, "pipeline_parallel_size": 1, "mode": "stop"}
    code, rep = post(server, "/admin/reconfigure", switch, "adm")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert code == 200, rep
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["total_output_tokens"] == 12 * 80
    switches = result["topology"]["switches"]
    assert [(s["from"].split("[")[0], s["to"].split("[")[0]) for s in switches] == [("TP2xPP2", "TP4xPP1")]
    assert 0 < switches[0]["time"] < result["duration"] and switches[0]["source"] == "admin"
    assert (tmp_path / "t.png").stat().st_size > 0


def test_health_503_after_a_worker_dies_without_recovery(tiny_llama):
    """With recovery off, a dead worker turns into clear errors and an unhealthy /health; the server process
    keeps answering."""
    import os
    import signal

    args = str(tiny_llama), "--dtype", "float64", "-tp", "2", "--worker-timeout-s", "10", "--no-worker-recovery"
    with remp_server(*args) as (url, proc):
        children = worker_pids(proc.pid)
        assert len(children) == 2
        os.kill(int(children[1]), signal.SIGKILL)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIError) as failed:
            list(client.completions.create(model=str(tiny_llama), prompt="abc", max_tokens=50, stream=True))
        assert not isinstance(failed.value, openai.APITimeoutError)  # refused or ended, never left waiting
        code, body = get(url, "/health")
        assert code == 503 and "worker 1" in body
        code, err = post(url, "/v1/completions", {"prompt": "abc", "max_tokens": 2})
        assert code == 503


def test_the_periodic_stats_line(caplog):
    """vLLM's stats line: throughputs over the interval, requests, KV use, prefix hits."""
    from types import SimpleNamespace

    from remp.entrypoints.metrics import StatsLog
    from remp.scheduler import Scheduler

    scheduler = Scheduler(10, 16, 8, 64, enable_prefix_caching=True)
    scheduler.pool.allocate(4)
    scheduler.pool.queries, scheduler.pool.hits = 200, 50
    engine = SimpleNamespace(replicas=[SimpleNamespace(scheduler=scheduler)], stats=SimpleNamespace(prompt_tokens=0))
    log = StatsLog(interval_s=0.0)
    with caplog.at_level("INFO", logger="remp"):
        log.step(engine, 7)
    (line,) = [r.getMessage() for r in caplog.records if "throughput" in r.getMessage()]
    assert "KV cache usage: 40.0%" in line and "Prefix cache hit rate: 25.0%" in line and "Running: 0 reqs" in line
