"""Two "machines" on one, for tests and benchmarks: network namespaces joined by a veth pair, each with its own
address, so that a head node and a worker node talk over a real network interface (and netem can shape it).
Needs root and `ip`; `reason_unavailable()` says why not, for a clean skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def reason_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"remp-probe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    dev = f"rp{os.getpid() % 100000}"
    r = _ip("link", "add", f"{dev}a", "type", "veth", "peer", "name", f"{dev}b", check=False)
    if r.returncode != 0:
        return f"no veth pairs here: {r.stderr.strip()}"
    _ip("link", "del", f"{dev}a", check=False)
    return None


@dataclass
class Nodes:
    """Namespaces names[i], each with address addrs[i] on device devs[i], the two ends of one veth pair."""

    names: list[str]
    addrs: list[str]
    devs: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, node: int, argv: list[str], log_level: str = "WARNING", **kw) -> subprocess.Popen:
        """`python argv...` inside namespace `node`, with the repository importable."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), REMP_LOGGING_LEVEL=log_level)
        env.pop("GLOO_SOCKET_IFNAME", None)
        p = subprocess.Popen(["ip", "netns", "exec", self.names[node], sys.executable, *argv], env=env, **kw)
        self.procs.append(p)
        return p

    def start_worker_node(self, port: int, workers_per_node: int, *flags: str, **kw) -> subprocess.Popen:
        """`remp serve --headless [flags]` in namespace 1, joining the head at addrs[0]:port."""
        argv = ["-m", "remp", "serve", "--headless", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                self.addrs[0], "--master-port", str(port), "--workers-per-node", str(workers_per_node), *flags]  # fmt: skip
        return self.popen(1, argv, **kw)

    def shape(self, node: int, qdisc: str) -> None:
        """Shape the egress of node's end of the link with a tc qdisc and its options, e.g. "netem rate 1gbit
        delay 1ms" or, on kernels without netem, "tbf rate 1gbit burst 64kb latency 50ms"."""
        cmd = ["ip", "netns", "exec", self.names[node], "tc", "qdisc", "replace", "dev", self.devs[node], "root"]
        r = subprocess.run(cmd + qdisc.split(), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"tc qdisc {qdisc!r} on {self.devs[node]}: {r.stderr.strip()}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for name in self.names:
            _ip("netns", "del", name, check=False)


def two_nodes() -> Nodes:
    tag = os.getpid() % 100000
    subnet = f"10.{200 + tag % 50}.{tag % 250}"
    names, devs = [f"remp-h{tag}", f"remp-w{tag}"], [f"rh{tag}", f"rw{tag}"]
    nodes = Nodes(names, [f"{subnet}.1", f"{subnet}.2"], devs)
    try:
        for name in names:
            _ip("netns", "add", name)
        _ip("link", "add", devs[0], "type", "veth", "peer", "name", devs[1])
        for name, dev, addr in zip(names, devs, nodes.addrs):
            _ip("link", "set", dev, "netns", name)
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", name, "link", "set", dev, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        nodes.close()
        raise
    return nodes
