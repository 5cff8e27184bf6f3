"""Start a server command (`remp serve`, vLLM, anything with a health URL) for a test or a benchmark, and stop it
leaving nothing behind.

The command runs in a session of its own with its output in a file (a file, not a pipe: a chatty server never
blocks on a full pipe). It is ready when its URL answers `health_path` with 200; the URL is given, or read
from the "remp: serving ... on URL" line `remp serve` prints (with `--port 0` it takes a free port itself, so
no other process can take it meanwhile). Stopping sends SIGINT, then SIGKILL to the whole session if it has
not exited in time; any process of its session that outlives it is killed and reported as an error.

    with launched(remp_serve_command("--dtype", "float32", "--port", "0")) as server:
        ... server.url ...
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

SERVING_LINE = re.compile(r"^remp: serving .* on (http://\S+)$", re.M)


class OutlivedError(RuntimeError):
    """Processes of a stopped server's session were still alive (they have been killed)."""


def remp_serve_command(*args: str) -> list[str]:
    """`remp serve ARGS` with this Python, so that a test or benchmark serves the code it imports."""
    return [sys.executable, "-m", "remp", "serve", *args]


def session_processes(sid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class LaunchedServer:
    """One server command. `url`: where it answers (None: read from its "serving ... on URL" line).
    `log_path`: its output (None: an anonymous temporary file). `interrupt_group`: SIGINT goes to its whole
    process group, as Ctrl-C in a terminal does (for servers whose children need it, e.g. vLLM's engine)."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        url: str | None = None,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        health_path: str = "/health",
        interrupt_group: bool = False,
    ):
        self.cmd, self.given_url, self.url = list(cmd), url, url
        self.log_path = Path(log_path) if log_path is not None else None
        self.env, self.health_path, self.interrupt_group = env, health_path, interrupt_group
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 180.0) -> float:
        """Starts the command and waits until it is healthy; returns the seconds that took. If it exits first or
        is not healthy within `timeout_s`, it is stopped and the error carries the end of its log."""
        if self.proc is not None:
            raise RuntimeError("the server is already started")
        self.url = self.given_url
        # append mode: the server's writes go to the end wherever our reads have moved the shared offset
        if self.log_path:
            self.log_path.write_text("")
            self._log = open(self.log_path, "a+")  # closed by stop()
        else:
            self._log = tempfile.TemporaryFile("a+")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True
        )
        try:
            while not self._healthy():
                if self.proc.poll() is not None:
                    raise RuntimeError(self._failure(f"exited with {self.proc.returncode} before it was healthy"))
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(self._failure(f"not healthy after {timeout_s:g} s (url {self.url})"))
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def _failure(self, what: str) -> str:
        return f"{' '.join(self.cmd[:5])} ... {what}; the end of its log:\n{self.log()[-3000:]}"

    def _healthy(self) -> bool:
        if self.url is None:
            found = SERVING_LINE.search(self.log())
            if found is None:
                return False
            self.url = found.group(1)
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        """What the server has written so far."""
        if self._log is None or self._log.closed:
            return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout_s: float = 30.0, linger_s: float = 10.0) -> None:
        """SIGINT; SIGKILL to the whole session after `timeout_s`. Raises OutlivedError if any process of its
        session is still alive `linger_s` after it ended (after killing them)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                if self.interrupt_group:
                    os.killpg(proc.pid, signal.SIGINT)
                else:
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_session(proc.pid)
                    proc.wait()
            deadline = time.monotonic() + linger_s
            while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if left:
                _kill_session(proc.pid)
                raise OutlivedError(f"processes of the server's session outlived it: {left}")
        finally:
            self._log.close()

    def __enter__(self) -> LaunchedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_session(sid: int) -> None:
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def launched(cmd: Sequence[str], *, timeout_s: float = 180.0, **kwargs) -> Iterator[LaunchedServer]:
    """A healthy server for the `with` block (LaunchedServer's keywords), stopped at its end."""
    server = LaunchedServer(cmd, **kwargs)
    server.start(timeout_s)
    with server:
        yield server
