"""The run over time: poll the server's topology while the load runs, then draw tokens/s and TTFT against the
clock with the topology switches and phases marked, to show what a live switch costs the clients."""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from remp.bench.datasets import PhaseWindow
from remp.bench.metrics import RequestResult

_GAUGE = re.compile(r"^(remp:(?:tensor|pipeline)_parallel_size)(?:\{[^}]*\})?\s+(\S+)")


def parse_topology_gauges(text: str) -> str | None:
    """Prometheus text -> "TP<t>xPP<p>" from the remp:tensor/pipeline_parallel_size gauges; None if absent."""
    found = {m[1]: int(float(m[2])) for line in text.splitlines() if (m := _GAUGE.match(line))}
    tp, pp = found.get("remp:tensor_parallel_size"), found.get("remp:pipeline_parallel_size")
    return None if tp is None or pp is None else f"TP{tp}xPP{pp}"


class TopologyPoller:
    """Polls GET /admin/topology (Bearer admin token), falling back to GET /metrics gauges, every `interval_s`.
    Switches come from the server's own switch history when it has one (exact times and pauses), otherwise from
    a topology change between two polls (e.g. after a restart). Times are seconds from the run start `wall0`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        wall0: float,
        admin_token: str | None = None,
        interval_s: float = 0.5,
    ):
        self.session, self.base_url, self.wall0, self.interval_s = session, base_url.rstrip("/"), wall0, interval_s
        self.headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.samples: list[tuple[float, str]] = []  # (t, topology) of each successful poll
        self.switches: list[dict] = []
        self.source: str | None = None  # "admin" or "metrics", whichever answered last
        self._use_admin = True
        self._seen: set[tuple] = set()

    async def _get(self, path: str, headers: dict) -> aiohttp.ClientResponse | None:
        try:
            resp = await self.session.get(
                self.base_url + path,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=max(2.0, self.interval_s * 4)),
            )
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return resp

    async def poll_once(self) -> None:
        now = time.time() - self.wall0
        topo, history, busy = None, None, False
        if self._use_admin and (resp := await self._get("/admin/topology", self.headers)) is not None:
            async with resp:
                if resp.status == 200:
                    try:
                        data = await resp.json(content_type=None)
                    except (ValueError, aiohttp.ClientError):
                        data = {}
                    topo = data.get("topology")
                    if not topo and "tensor_parallel_size" in data:
                        topo = f"TP{data['tensor_parallel_size']}xPP{data.get('pipeline_parallel_size', 1)}"
                    history = data.get("switches")
                    # the topology changes at the cut-over, a little before the switch enters the history
                    busy = bool(data.get("switching_to"))
                    self.source = "admin"
                elif resp.status in (401, 403, 404, 405):
                    self._use_admin = False  # no (usable) admin API: stop asking
        if topo is None and (resp := await self._get("/metrics", {})) is not None:
            async with resp:
                if resp.status == 200:
                    topo = parse_topology_gauges(await resp.text())
                    self.source = "metrics" if topo else self.source
        if topo is None:
            return
        added = 0
        for sw in history or []:
            key = (sw.get("time"), sw.get("from"), sw.get("to"))
            if key not in self._seen and sw.get("time") is not None and sw["time"] >= self.wall0:
                self._seen.add(key)
                self.switches.append(
                    {**sw, "time": sw["time"] - self.wall0, "unix_time": sw["time"], "source": "admin"}
                )
                added += 1
        # a change no history explains (e.g. a restart that lost it); not while the server reports a switch
        # under way: its history entry follows
        if not added and not busy and self.samples and self.samples[-1][1] != topo:
            self.switches.append(
                {"time": now, "unix_time": self.wall0 + now, "from": self.samples[-1][1], "to": topo, "source": "poll"}
            )
        self.samples.append((now, topo))
        self.switches.sort(key=lambda s: s["time"])

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set, then once more so late switches are caught."""
        while not stop.is_set():
            await self.poll_once()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        await self.poll_once()

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": [{"time": t, "topology": s} for t, s in self.samples],
            "switches": self.switches,
        }


def tokens_per_second(
    results: list[RequestResult], duration_s: float, bin_s: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Output tokens delivered per `bin_s` bin, by chunk arrival time (a chunk carries output_tokens/chunks)."""
    nbins = max(1, math.ceil(duration_s / bin_s))
    counts = np.zeros(nbins)
    for r in results:
        times = r.chunk_times()
        if times.size:
            idx = np.clip((times // bin_s).astype(int), 0, nbins - 1)
            np.add.at(counts, idx, r.output_tokens / times.size)
    return np.arange(nbins) * bin_s, counts / bin_s


def plot_timeline(
    path: str | Path,
    results: list[RequestResult],
    duration_s: float,
    switches: list[dict],
    phases: list[PhaseWindow] | None = None,
    title: str = "",
) -> Path:
    """Two panels sharing the time axis: output tokens/s (1 s bins), and each request's TTFT at its send time
    (failures as red crosses on the axis). Dashed lines at topology switches, shaded bands per phase."""
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("--timeline needs matplotlib, from the `bench` extra: pip install 'remp[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.5), constrained_layout=True)
    t, tps = tokens_per_second(results, duration_s)
    top.stairs(tps, np.append(t, t[-1] + 1.0), color="tab:blue")
    top.set_ylabel("output tokens/s")
    ok = [r for r in results if r.success]
    bad = [r for r in results if not r.success]
    bottom.scatter([r.send_time for r in ok], [r.ttft * 1000 for r in ok], s=8, alpha=0.6, label="TTFT")
    if bad:
        bottom.scatter(
            [r.send_time for r in bad], [0] * len(bad), marker="x", color="tab:red", label=f"failed ({len(bad)})"
        )
    bottom.set_ylabel("TTFT (ms)")
    bottom.set_xlabel("time since start (s)")
    bottom.legend(loc="upper right", fontsize=8)
    if phases and len(phases) > 1:
        for ph in phases:
            for ax in (top, bottom):
                ax.axvspan(
                    ph.start_s,
                    max(ph.end_s, ph.start_s + 1e-3),
                    color="0.5" if ph.index % 2 else "0.8",
                    alpha=0.12,
                    lw=0,
                )
            top.text(ph.start_s, 1.0, f" {ph.name}", transform=top.get_xaxis_transform(), va="top", fontsize=8)
    for sw in switches:
        for ax in (top, bottom):
            ax.axvline(sw["time"], color="tab:red", ls="--", lw=1)
        pause = f" ({sw['pause_s'] * 1000:.0f} ms pause)" if sw.get("pause_s") is not None else ""
        top.text(
            sw["time"],
            0.92,
            f" {sw.get('from', '?')}→{sw.get('to', '?')}{pause}",
            color="tab:red",
            transform=top.get_xaxis_transform(),
            va="top",
            fontsize=8,
        )
    top.set_xlim(0, max(duration_s, 1e-3))
    top.set_title(title or "remp bench serve")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
