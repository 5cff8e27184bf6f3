"""remp/tools/launch.py on a fake server (a few lines of http.server): it finds the URL in the "serving ... on"
line, waits for /health, stops the server with SIGINT, and kills and reports what outlives it."""

import socket
import sys
import time
import urllib.request

import pytest

from remp.tools.launch import LaunchedServer, OutlivedError, launched, session_processes

pytestmark = pytest.mark.timeout(60)

FAKE = r"""
import http.server, subprocess, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
if "linger" in sys.argv:  # a child that ignores Ctrl-C and outlives the server
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    subprocess.Popen([sys.executable, "-c", code])
if "exit" in sys.argv:
    sys.exit("no model here")
server = http.server.HTTPServer(("127.0.0.1", 0), Health)
print(f"remp: serving fake as TP1xPP1 on http://127.0.0.1:{server.server_port}", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def fake(*flags: str) -> list[str]:
    return [sys.executable, "-c", FAKE, *flags]


def gone(sid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not session_processes(sid)


def test_url_from_the_serving_line_health_and_a_clean_stop(tmp_path):
    log = tmp_path / "server.log"
    with launched(fake(), log_path=log, timeout_s=30) as server:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
            assert r.status == 200
        proc = server.proc
    assert proc.returncode == 0 and "interrupted" in log.read_text()  # SIGINT, not a kill
    assert gone(proc.pid)


def test_a_process_that_outlives_the_server_is_killed_and_reported():
    server = LaunchedServer(fake("linger"))
    server.start(timeout_s=30)
    sid = server.proc.pid
    assert len(session_processes(sid)) == 2
    with pytest.raises(OutlivedError, match="outlived"):
        server.stop(linger_s=0.5)
    assert gone(sid)


def test_exit_before_healthy_carries_the_log():
    server = LaunchedServer(fake("exit"))
    with pytest.raises(RuntimeError, match="exited with 1 before it was healthy(.|\n)*no model here"):
        server.start(timeout_s=30)
    assert server.proc is None


def test_a_given_url_that_never_answers_times_out():
    with socket.socket() as s:  # a port nobody listens on: take one and free it
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    server = LaunchedServer([sys.executable, "-c", "import time; time.sleep(30)"], url=url)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not healthy after 1 s"):
        server.start(timeout_s=1)
    assert time.monotonic() - t0 < 10 and server.proc is None
