"""Start `remp serve` as a subprocess for tests; always stopped, never orphaned."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager


def worker_pids(server_pid: int) -> list[int]:
    """The server's worker processes, by rank: children of its multiprocessing fork server, in start order."""

    def children(pid: int, pattern: str = "") -> list[int]:
        args = ["pgrep", "-P", str(pid)] + (["-f", pattern] if pattern else [])
        return sorted(int(p) for p in subprocess.run(args, capture_output=True, text=True).stdout.split())

    return [w for fs in children(server_pid, "forkserver") for w in children(fs)]


def session_processes(sid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@contextmanager
def remp_server(*args: str, timeout: float = 180.0):
    """The server in its own session; on exit it gets SIGINT, and no process of its session may outlive it."""
    # port 0: the server takes a free port itself and names it, so no other process can take it meanwhile
    cmd = [sys.executable, "-m", "remp", "serve", *args, "--port", "0"]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read()}")
            if url is None:
                log.seek(0)
                url = next(iter(re.findall(r"^remp: serving .* on (http://\S+)\n", log.read(), re.M)), None)
            try:
                if url:
                    with urllib.request.urlopen(url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become healthy")
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        deadline = time.monotonic() + 10
        while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert not left, f"processes of the server's session outlived it: {left}"


def post(url, path, body, token=None, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"content-type": "application/json"})
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url, path, token=None):
    req = urllib.request.Request(url + path)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
