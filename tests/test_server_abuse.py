"""`remp serve` under abuse: a client that walks away mid-request, bodies far over the limit, malformed and
odd input, concurrent switches, and SIGINT with streams open. Every refusal is an OpenAI-shaped 4xx; the
server keeps serving; nothing is left behind."""

import json
import os
import signal
import socket
import threading
import time
import urllib.parse

import openai
import pytest

from remp.tools.random_model import write_random_llama
from tests.server_utils import get, post, remp_server

LONG = 3000  # tokens: a request that runs for seconds on the tiny model


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("long_llama"), seed=4, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(long_llama):
    args = f"{long_llama} --dtype float64 -tp 2 --admin-token adm --max-model-len 4096".split()
    with remp_server(*args) as (url, _):
        yield url


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in get(url, "/metrics")[1].splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def connect(url: str) -> socket.socket:
    u = urllib.parse.urlparse(url)
    return socket.create_connection((u.hostname, u.port), timeout=30)


def head(path: str, extra: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def assert_openai_error(code: int, body: dict, status: int, param: str | None = None) -> None:
    assert code == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


class Stream(threading.Thread):
    """A streaming completion read as raw SSE lines, with the arrival time of each; close() walks away."""

    def __init__(self, url: str, max_tokens: int = LONG, api_key: str | None = None):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.times, self.lines, self.error = url, max_tokens, [], [], None
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.sock = connect(url)

    def run(self) -> None:
        body = json.dumps({"prompt": "abc", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True})
        try:
            with self.sock:
                self.sock.sendall(
                    head("/v1/completions", f"Content-Length: {len(body)}\r\n{self.auth}") + body.encode()
                )
                f = self.sock.makefile("rb")
                while line := f.readline():
                    self.times.append(time.monotonic())
                    self.lines.append(line.decode().strip())
                    if self.lines[-1] == "data: [DONE]":
                        break
        except OSError as e:
            self.error = e

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.join(timeout=10)

    @property
    def events(self) -> list[str]:
        return [x[6:] for x in self.lines if x.startswith("data: ")]

    def max_gap(self, start: float, end: float) -> float:
        times = [t for t in self.times if start <= t <= end]
        return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


def test_abandoned_non_streaming_request_is_aborted(server):
    aborted = metric(server, "remp:request_aborted_total", reason="client_disconnected")
    body = json.dumps({"prompt": "abc", "max_tokens": LONG, "ignore_eos": True}).encode()
    s = connect(server)
    s.sendall(head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
    assert wait_until(lambda: metric(server, "remp:num_requests_running") == 1)
    s.close()  # the client walks away without reading anything
    assert wait_until(lambda: metric(server, "remp:num_requests_running") == 0, timeout=2)
    assert metric(server, "remp:kv_cache_usage_perc") == 0  # its KV blocks are free again
    assert metric(server, "remp:request_aborted_total", reason="client_disconnected") == aborted + 1
    generated = metric(server, "remp:generation_tokens_total")
    time.sleep(0.3)
    assert metric(server, "remp:generation_tokens_total") == generated < LONG


def test_huge_bodies_refused_at_once_while_a_stream_flows(server):
    stream = Stream(server)
    stream.start()
    assert wait_until(lambda: len(stream.events) > 5)
    t_start = time.monotonic()
    # 20 MB announced: refused from the headers, before the body is read
    with connect(server) as s:
        s.sendall(head("/v1/completions", "Content-Length: 20000000\r\n") + b'{"prompt": "' + b"a" * 65536)
        t0 = time.monotonic()
        assert status_of(s) == 413 and time.monotonic() - t0 < 1.0
    # a chunked upload carries no length: refused as soon as the bytes received pass the limit (4 MiB)
    with connect(server) as s:
        s.sendall(head("/v1/completions", "Transfer-Encoding: chunked\r\n"))
        piece = b"a" * 65536
        sender = threading.Thread(
            target=lambda: [s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece)) for _ in range(80)], daemon=True
        )
        t0 = time.monotonic()
        sender.start()
        assert status_of(s) == 413 and time.monotonic() - t0 < 1.0
    # under the body limit but more text than the context can hold: refused without being tokenized
    t0 = time.monotonic()
    code, body = post(server, "/v1/completions", {"prompt": "word " * 700_000, "max_tokens": 4})
    assert_openai_error(code, body, 400, "prompt")
    assert "characters" in body["error"]["message"] and time.monotonic() - t0 < 1.0
    t_end = time.monotonic()
    assert wait_until(lambda: stream.times[-1] > t_end)
    assert stream.max_gap(t_start, t_end + 0.1) < 1.0  # the running stream never stalled
    stream.close()


def test_a_20_mb_body_from_urllib_and_httpx_gets_the_413(server):
    """Clients that send the whole body before they read get the 413 itself, not "connection reset by peer"."""
    import httpx2
    import requests

    body = b'{"prompt": "' + b"a" * 20_000_000 + b'"}'
    code, err = post(server, "/v1/completions", None, raw=body)  # urllib
    assert code == 413 and "--max-request-bytes" in err["error"]["message"]
    headers = {"content-type": "application/json"}
    for r in (
        requests.post(server + "/v1/completions", data=body, headers=headers, timeout=60),
        httpx2.post(server + "/v1/completions", content=body, headers=headers, timeout=60),
    ):
        assert r.status_code == 413 and r.json()["error"]["code"] == 413


ODD = [
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),  # a lone surrogate: valid JSON, not valid Unicode
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udfff"}]}, "messages.0.content"),
    ("/v1/completions", {"prompt": "abc", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [True, 5]}, None),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 10**12}, "max_tokens"),
    ("/v1/completions", {"prompt": "abc", "max_tokens": 4094}, "max_tokens"),  # 3+ prompt tokens: > 4096
    ("/v1/completions", {"prompt": "abc", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "abc", "temperature": "hot"}, "temperature"),
    ("/admin/reconfigure", {"tensor_parallel_size": 2**70, "pipeline_parallel_size": 1}, "tensor_parallel_size"),
    ("/admin/reconfigure", {"tensor_parallel_size": True, "pipeline_parallel_size": 1}, "tensor_parallel_size"),
    ("/admin/reconfigure", {"tensor_parallel_size": 3, "pipeline_parallel_size": 1}, None),  # needs 3 workers
]


@pytest.mark.parametrize("path, body, param", ODD, ids=[f"{p} {json.dumps(b)[:40]}" for p, b, _ in ODD])
def test_odd_input_gets_openai_400(server, path, body, param):
    code, reply = post(server, path, body, token="adm")
    assert_openai_error(code, reply, 400, param)


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "\xff\xfe abc"}', b"[" * 5000 + b"]" * 5000, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
    ids=["invalid-utf8", "deep-array", "deep-prompt"],
)
def test_unparseable_bodies_get_openai_400(server, raw):
    assert_openai_error(*post(server, "/v1/completions", None, raw=raw), 400)


def test_unknown_route_and_method_are_openai_errors(server):
    code, body = get(server, "/v1/nope")
    assert_openai_error(code, json.loads(body), 404)
    code, body = get(server, "/v1/completions")
    assert_openai_error(code, json.loads(body), 405)


def test_a_batch_is_checked_whole_before_any_prompt_runs(server):
    before = metric(server, "remp:prompt_tokens_total")
    code, body = post(server, "/v1/completions", {"prompt": ["fine", "also fine", "bad \ud800"], "max_tokens": 4})
    assert_openai_error(code, body, 400, "prompt.2")
    code, body = post(server, "/v1/completions", {"prompt": [[1, 2], [10**6]], "max_tokens": 4})
    assert_openai_error(code, body, 400, "prompt.1")
    time.sleep(0.3)
    assert metric(server, "remp:prompt_tokens_total") == before  # nothing was admitted
    # ignore_eos: the tiny model's ~260-token vocabulary samples EOS within 4 tokens a few percent of the time
    code, body = post(server, "/v1/completions", {"prompt": ["fine", "also fine"], "max_tokens": 4, "ignore_eos": True})
    assert code == 200 and [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 8


def test_concurrent_reconfigures_one_runs_one_gets_409(server):
    barrier, results = threading.Barrier(2), []

    def switch(tp, pp):
        barrier.wait()
        results.append(
            post(server, "/admin/reconfigure", {"tensor_parallel_size": tp, "pipeline_parallel_size": pp}, token="adm")
        )

    threads = [threading.Thread(target=switch, args=a) for a in [(1, 2), (1, 2)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(code for code, _ in results)
    assert codes == [200, 409], results
    conflict = next(body for code, body in results if code == 409)
    assert_openai_error(409, conflict, 409)
    assert "TP1xPP2" in conflict["error"]["message"]
    topology = json.loads(get(server, "/admin/topology", token="adm")[1])
    assert topology["topology"].startswith("TP1xPP2") and topology["switching_to"] is None
    assert post(server, "/admin/reconfigure", {"tensor_parallel_size": 2, "pipeline_parallel_size": 1}, "adm")[0] == 200


def test_api_key_then_sigint_with_open_streams_ends_each_and_exits_clean(long_llama):
    """One server (an API key, no admin token) checks the key, then is stopped with four streams open."""
    shm_before = set(os.listdir("/dev/shm"))
    grace = 1.0
    args = f"{long_llama} --dtype float64 -tp 2 --max-num-seqs 2 --max-model-len 4096 --api-key k1".split()
    with remp_server(*args, "--shutdown-timeout", str(grace)) as (url, proc):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0).models.list().data[0].id
        code, body = get(url, "/admin/topology", token="anything")
        assert_openai_error(code, json.loads(body), 404)  # no admin token: no admin API

        streams = [Stream(url, api_key="k1") for _ in range(4)]
        for s in streams:
            s.start()
        # two streams generate, two wait for a slot; none can finish within the grace period
        assert wait_until(
            lambda: metric(url, "remp:num_requests_running") == 2 and metric(url, "remp:num_requests_waiting") == 2
        )
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=grace + 10) == 0
        assert time.monotonic() - t0 < grace + 5
        for s in streams:
            s.join(timeout=10)
            assert s.error is None and s.events and s.events[-1] == "[DONE]", s.lines[-3:]
            error = json.loads(s.events[-2])["error"]
            assert error["code"] == 503 and "shutting down" in error["message"]
        assert metric_after_exit_is_gone(url)
    assert not {f for f in set(os.listdir("/dev/shm")) - shm_before if f.startswith("psm_")}


def metric_after_exit_is_gone(url: str) -> bool:
    try:
        get(url, "/health")
    except OSError:
        return True  # nobody listens any more
    return False
