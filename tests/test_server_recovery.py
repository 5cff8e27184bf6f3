"""Through the server: a worker SIGKILLed while 6 clients stream; every stream completes, identical to a run
without the failure, the official client sees no error, /health goes degraded then ok, /metrics counts it."""

import os
import signal
import threading
import time

import openai

from remp import LLM, SamplingParams
from tests.server_utils import get, remp_server, worker_pids
from tests.test_server_abuse import metric

PROMPTS = ["alpha beta", "gamma", "delta epsilon zeta", "eta", "theta iota", "kappa lambda mu"]
TOKENS = 300


def test_worker_killed_while_streaming(tiny_llama):
    with LLM(str(tiny_llama), dtype="float64") as llm:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        refs = {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}
    args = str(tiny_llama), "--dtype", "float64", "-tp", "2", "-pp", "2", "--admin-token", "adm"
    with remp_server(*args) as (url, proc):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        results, errors, first = {}, [], threading.Barrier(len(PROMPTS) + 1)

        def stream(p):
            try:
                chunks = client.completions.create(
                    model=str(tiny_llama), prompt=p, max_tokens=TOKENS, temperature=0, stream=True,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                text = []
                for i, c in enumerate(chunks):
                    text.append(c.choices[0].text if c.choices else "")
                    if i == 3:
                        first.wait(60)
                results[p] = "".join(text)
            except Exception as e:
                errors.append(repr(e))

        health, stop = [], threading.Event()

        def watch_health():
            while not stop.is_set():
                code, body = get(url, "/health")
                status = body and __import__("json").loads(body).get("status")
                if not health or health[-1] != (code, status):
                    health.append((code, status))
                time.sleep(0.01)

        threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]
        watcher = threading.Thread(target=watch_health)
        for t in [*threads, watcher]:
            t.start()
        first.wait(60)  # every stream has tokens
        os.kill(worker_pids(proc.pid)[2], signal.SIGKILL)
        for t in threads:
            t.join(180)
        stop.set()
        watcher.join(10)
        assert not errors
        assert results == refs
        assert (200, "degraded") in health and health[-1] == (200, "ok")
        assert metric(url, "remp:worker_failures_total") == 1 and metric(url, "remp:recoveries_total") == 1
        assert metric(url, "remp:requests_recomputed_total") >= 1
        assert metric(url, "remp:num_workers") == 3
        assert len(worker_pids(proc.pid)) == 3
