"""Start `remp serve` as a subprocess for tests; always stopped, never orphaned."""

import json
import subprocess
import urllib.error
import urllib.request
from contextlib import contextmanager

from remp.tools.launch import launched, remp_serve_command


def worker_pids(server_pid: int) -> list[int]:
    """The server's worker processes, by rank: children of its multiprocessing fork server, in start order."""

    def children(pid: int, pattern: str = "") -> list[int]:
        args = ["pgrep", "-P", str(pid)] + (["-f", pattern] if pattern else [])
        return sorted(int(p) for p in subprocess.run(args, capture_output=True, text=True).stdout.split())

    return [w for fs in children(server_pid, "forkserver") for w in children(fs)]


@contextmanager
def remp_server(*args: str, timeout: float = 180.0):
    """`remp serve ARGS` on a free port (remp/tools/launch.py): yields (url, process); on exit it gets SIGINT, and
    no process of its session may outlive it."""
    with launched(remp_serve_command(*args, "--port", "0"), timeout_s=timeout) as server:
        yield server.url, server.proc


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
