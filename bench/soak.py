"""A soak of topology switches: many in a row under load, and nothing lost, changed or leaked.

    python bench/soak.py --switches 1000 --kills 10 --time-limit-s 2700
    python bench/soak.py --switches 1000 --kills 10 --time-limit-s 2700 --resume bench/results/soak.json

A pool of up to 4 workers serves a tiny random Llama in float64 while requests keep coming: random prompt and
output lengths, some prompts sharing prefixes (the prefix cache), greedy or seeded sampling, a few requests in
flight at all times. Between bursts of steps the engine switches to a random shape of the pool: dp x tp x pp of
1 to 4 workers (growing, shrinking, data-parallel replicas), live or stop-the-world. At points spread over the run
a random worker is SIGKILLed, between switches or during a live pre-copy, and the engine recovers onto the
survivors (the next switches grow the pool back). At the end every request's tokens and finish reason are
compared with an unswitched one-worker run of the same requests, and the driver's processes, the shared-memory
segments, the driver's open file descriptors and threads are counted against their number before the engine
started; the RSS of the driver and of the workers is recorded every 100 switches.

Bounded in time: no switch starts after --time-limit-s (the requests in flight then finish). A run that stops
short can be continued with --resume FILE: a new engine runs the switches left and the file keeps each part
(chunk) and their totals. Runs on loopback only (the driver's store listens on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path

from remp import LLMEngine, SamplingParams
from remp.bench.results import save_result
from remp.switch.on_driver import SwitchAborted
from remp.topology import Topology
from remp.worker import start_fork_server

MAX_WORKERS = 4
ENGINE = dict(
    dtype="float64",
    block_size=8,
    num_kv_blocks=160,
    max_model_len=256,
    max_num_batched_tokens=64,
    worker_timeout_s=60,
    max_workers=MAX_WORKERS,
    distributed_executor_backend="mp",
)
PREFIXES = 3  # shared prompt prefixes: the prefix cache has blocks to keep and move


# ---- what the machine holds -------------------------------------------------------------------------------------
def descendants() -> dict[int, str]:
    """Every process below this one: pid -> command line."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {}, [os.getpid()]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                except OSError:
                    found[child] = "?"
                frontier.append(child)
    return found


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def open_fds() -> dict[int, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def resources() -> dict:
    return {
        "processes": descendants(),
        "shm": shm_segments(),
        "fds": open_fds(),
        "threads": len(os.listdir("/proc/self/task")),
    }


# ---- the load -----------------------------------------------------------------------------------------------
@dataclass
class Load:
    rng: random.Random
    prefixes: list[list[int]] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.prefixes = [[256] + [self.rng.randrange(256) for _ in range(self.rng.randint(16, 24))] for _ in range(3)]

    def next(self, tag: str) -> tuple[str, list[int], SamplingParams]:
        rng = self.rng
        self.count += 1
        head = rng.choice(self.prefixes) if rng.random() < 0.5 else [256]
        prompt = head + [rng.randrange(256) for _ in range(rng.randint(1, 48))]
        n = rng.randint(1, 64)
        if rng.random() < 0.5:
            params = SamplingParams(max_tokens=n, temperature=0)
        else:
            params = SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, seed=rng.randrange(1 << 30))
        return f"{tag}-{self.count}", prompt, params


def shapes(config) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) the pool can run: 1 to MAX_WORKERS workers."""
    out = []
    for dp in range(1, MAX_WORKERS + 1):
        for tp in range(1, MAX_WORKERS + 1):
            for pp in range(1, MAX_WORKERS + 1):
                if dp * tp * pp > MAX_WORKERS:
                    continue
                try:
                    Topology(tp, pp, dp=dp).validate(config, MAX_WORKERS)
                except ValueError:
                    continue
                out.append((dp, tp, pp))
    return out


# ---- the soak -------------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, model: str, switches: int, kills: int, seed: int, time_limit_s: float, tag: str):
        self.rng = random.Random(seed)
        self.load = Load(random.Random(seed + 1))
        self.n, self.time_limit_s, self.tag = switches, time_limit_s, tag
        # kills spread over the run (by switch count, or by time when the time bound comes first): half between
        # two switches, half during a live switch
        self.kill_plan = [
            ((k + 1) * switches / (kills + 1), (k + 1) * time_limit_s / (kills + 1), "during" if k % 2 else "between")
            for k in range(kills)
        ]
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.outputs: dict[str, tuple[list[int], str]] = {}
        self.pids: set[int] = set()
        self.samples: list[dict] = []
        self.counts = {"live": 0, "stop": 0, "fallback_stop": 0, "grow": 0, "shrink": 0, "same_size": 0, "dp": 0}
        self.counts["aborted"] = 0
        self.kills: list[dict] = []
        self.switch_s: list[float] = []
        # the fork server and multiprocessing's resource tracker outlive engines: started before the count
        start_fork_server()
        resource_tracker.ensure_running()
        self.before = resources()
        self.engine = LLMEngine(model=model, tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
        self.shapes = shapes(self.engine.model_config)
        self.t0 = time.perf_counter()

    # requests in and out
    def top_up(self) -> None:
        want = self.rng.randint(3, 8)
        while self.engine.get_num_unfinished_requests() < want:
            rid, prompt, params = self.load.next(self.tag)
            self.requests[rid] = (prompt, params)
            self.engine.add_request(rid, {"prompt_token_ids": prompt}, params)

    def step(self) -> None:
        self.pids |= {p.pid for p in self.engine.executor.procs}
        for o in self.engine.step():
            if o.finished:
                self.outputs[o.request_id] = (list(o.outputs[0].token_ids), o.outputs[0].finish_reason)

    def switch(self, i: int) -> None:
        engine, kill = self.engine, self.due_kill(i)
        if kill == "between" and self.kill():
            recovered = len(engine.stats.switches)
            while len(engine.stats.switches) == recovered:  # the next steps notice the loss and recover
                self.top_up()
                self.step()
        old = engine.topology
        dp, tp, pp = self.rng.choice([s for s in self.shapes if s != (old.dp, old.tp, old.pp)])
        mode = "live" if kill == "during" else self.rng.choice(["live", "stop"])
        done: dict = {}
        t0 = time.perf_counter()
        engine.start_reconfigure(tp, pp, mode=mode, on_done=lambda r, e: done.update(r=r, e=e), data_parallel_size=dp)
        steps = 0
        while not done:
            if kill == "during" and steps == 1:
                self.kill()
            if engine.has_unfinished_requests():
                self.step()
            else:
                engine.advance_switch(wait_s=0.01)
            steps += 1
        self.switch_s.append(time.perf_counter() - t0)
        if done["e"] is not None:
            if not isinstance(done["e"], SwitchAborted):
                raise done["e"]
            self.counts["aborted"] += 1  # a kill called it off: the recovery switched instead
            return
        r, new = done["r"], engine.topology
        self.counts["fallback_stop" if r.fallback else r.mode] += 1
        self.counts["grow" if new.size > old.size else "shrink" if new.size < old.size else "same_size"] += 1
        self.counts["dp"] += new.dp > 1 or old.dp > 1

    def due_kill(self, i: int) -> str | None:
        """The next planned kill's kind if switch i reaches its place in the run (by count or time), else None."""
        if self.kill_plan and (i >= self.kill_plan[0][0] or time.perf_counter() - self.t0 >= self.kill_plan[0][1]):
            return self.kill_plan.pop(0)[2]
        return None

    def kill(self) -> bool:
        """SIGKILL a random worker of the pool (not the last one: nothing would survive to recover onto)."""
        ex = self.engine.executor
        if ex.pool_size < 2:
            self.kills.append({"skipped": "one worker left"})
            return False
        rank = self.rng.randrange(ex.pool_size)
        pid = ex.procs[rank].pid
        os.kill(pid, signal.SIGKILL)
        self.kills.append({"rank": rank, "pid": pid, "pool": ex.pool_size, "topology": str(self.engine.topology)})
        return True

    def sample(self, i: int) -> None:
        ex = self.engine.executor
        gc.collect()
        self.samples.append(
            {
                "switches": i,
                "elapsed_s": round(time.perf_counter() - self.t0, 1),
                "pool": ex.pool_size,
                "topology": str(self.engine.topology),
                "driver_rss_mb": round(rss_mb(os.getpid()), 1),
                "worker_rss_mb": [round(rss_mb(p.pid), 1) for p in ex.procs],
                "fds": len(open_fds()),
                "threads": len(os.listdir("/proc/self/task")),
                "shm": len(shm_segments()),
                "processes": len(descendants()),
                "requests_done": len(self.outputs),
            }
        )
        s = self.samples[-1]
        print(
            f"[{s['elapsed_s']:7.1f} s] {i:5d} switches, {s['topology']}, driver {s['driver_rss_mb']} MB, workers "
            f"{s['worker_rss_mb']} MB, fds {s['fds']}, threads {s['threads']}, requests done {s['requests_done']}",
            flush=True,
        )

    def run(self) -> int:
        """Switch until n switches are done or the time is up; then finish the requests. Returns the switches."""
        i = 0
        try:
            self.sample(0)
            while i < self.n and time.perf_counter() - self.t0 < self.time_limit_s:
                self.top_up()
                for _ in range(self.rng.randint(1, 6)):
                    self.step()
                self.switch(i + 1)
                i += 1
                if i % 100 == 0:
                    self.sample(i)
            if i % 100:
                self.sample(i)
            while self.engine.has_unfinished_requests():
                self.step()
            self.recoveries = [r for r in self.engine.stats.switches if r.cause == "worker_lost"]
        finally:
            self.engine.shutdown()
        return i

    def leaks(self) -> dict:
        """What is left after the engine's shutdown that was not there before it started."""
        deadline = time.monotonic() + 10
        while any(alive(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        gc.collect()
        after = resources()
        return {
            "workers_alive": sorted(p for p in self.pids if alive(p)),
            "processes": {p: c for p, c in after["processes"].items() if p not in self.before["processes"]},
            "shm_segments": sorted(after["shm"] - self.before["shm"]),
            "fds": {fd: t for fd, t in after["fds"].items() if fd not in self.before["fds"]},
            "threads": after["threads"] - self.before["threads"],
        }


def reference(model: str, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str]]:
    """The same requests on one worker in this process, never switched."""
    engine = LLMEngine(model=model, **{**ENGINE, "max_workers": 1, "distributed_executor_backend": None})
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    out = {}
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = (list(o.outputs[0].token_ids), o.outputs[0].finish_reason)
    finally:
        engine.shutdown()
    return out


def growth_per_100(samples: list[dict], key) -> float | None:
    """Least-squares slope of a sampled value per 100 switches (None with fewer than 2 samples)."""
    pts = [(s["switches"], key(s)) for s in samples]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return round(slope * 100, 3)


def run_chunk(model: str, switches: int, kills: int, seed: int, time_limit_s: float, tag: str) -> dict:
    soak = Soak(model, switches, kills, seed, time_limit_s, tag)
    t0 = time.perf_counter()
    done = soak.run()
    wall = time.perf_counter() - t0
    leaks = soak.leaks()
    ref = reference(model, soak.requests)
    lost = sorted(set(soak.requests) - set(soak.outputs))
    changed = sorted(rid for rid in soak.outputs if soak.outputs[rid] != ref.get(rid))
    tokens = sum(len(t) for t, _ in soak.outputs.values())
    kills_done = [k for k in soak.kills if "skipped" not in k]
    return {
        "seed": seed,
        "switches": done,
        "switches_asked": switches,
        "wall_s": round(wall, 1),
        "switch_s_median": round(sorted(soak.switch_s)[len(soak.switch_s) // 2], 3) if soak.switch_s else None,
        "switch_s_max": round(max(soak.switch_s), 3) if soak.switch_s else None,
        "counts": soak.counts,
        "kills": len(kills_done),
        "kills_skipped": len(soak.kills) - len(kills_done),
        "recoveries": len(soak.recoveries),
        "requests": len(soak.requests),
        "tokens": tokens,
        "lost_requests": lost,
        "changed_requests": changed,
        "changed_tokens": sum(
            sum(a != b for a, b in zip(soak.outputs[r][0], ref[r][0])) + abs(len(soak.outputs[r][0]) - len(ref[r][0]))
            for r in changed
            if r in ref
        ),
        "leaks": {
            "workers_alive": leaks["workers_alive"],
            "processes": leaks["processes"],
            "shm_segments": leaks["shm_segments"],
            "fds": leaks["fds"],
            "threads": leaks["threads"],
        },
        "growth_per_100_switches": {
            "driver_rss_mb": growth_per_100(soak.samples, lambda s: s["driver_rss_mb"]),
            "worker_rss_mb_mean": growth_per_100(
                soak.samples, lambda s: sum(s["worker_rss_mb"]) / max(1, len(s["worker_rss_mb"]))
            ),
            "fds": growth_per_100(soak.samples, lambda s: s["fds"] - 2 * s["pool"]),
            "threads": growth_per_100(soak.samples, lambda s: s["threads"]),
        },
        "samples": soak.samples,
    }


def totals(chunks: list[dict]) -> dict:
    return {
        "switches": sum(c["switches"] for c in chunks),
        "kills": sum(c["kills"] for c in chunks),
        "recoveries": sum(c["recoveries"] for c in chunks),
        "requests": sum(c["requests"] for c in chunks),
        "tokens": sum(c["tokens"] for c in chunks),
        "lost_requests": sum(len(c["lost_requests"]) for c in chunks),
        "changed_tokens": sum(c["changed_tokens"] for c in chunks),
        "leaked_workers": sum(len(c["leaks"]["workers_alive"]) for c in chunks),
        "leaked_processes": sum(len(c["leaks"]["processes"]) for c in chunks),
        "leaked_shm_segments": sum(len(c["leaks"]["shm_segments"]) for c in chunks),
        "leaked_fds": sum(len(c["leaks"]["fds"]) for c in chunks),
        "wall_s": round(sum(c["wall_s"] for c in chunks), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--switches", type=int, default=1000)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--time-limit-s", type=float, default=2700.0, help="no switch starts after this (per run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", metavar="JSON", help="continue a soak saved in this file (its switches left)")
    p.add_argument("--label", default="", help="suffix of the result file's name")
    a = p.parse_args()
    chunks: list[dict] = []
    if a.resume:
        chunks = json.loads(Path(a.resume).read_text())["chunks"]
    left = a.switches - sum(c["switches"] for c in chunks)
    kills_left = a.kills - sum(c["kills"] for c in chunks)
    if left <= 0:
        print(json.dumps(totals(chunks), indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="remp-soak-") as tmp:
        from remp.tools.random_model import write_random_llama

        model = str(write_random_llama(tmp, seed=1))
        chunk = run_chunk(model, left, max(0, kills_left), a.seed + len(chunks), a.time_limit_s, f"c{len(chunks)}")
    chunks.append(chunk)
    result = {"switches_asked": a.switches, "kills_asked": a.kills, "totals": totals(chunks), "chunks": chunks}
    path = save_result(result, f"soak{a.label}", dtype="float64")
    print(json.dumps({k: v for k, v in chunk.items() if k != "samples"}, indent=1))
    print("totals:", json.dumps(result["totals"]))
    print(f"saved {path}")
    bad = result["totals"]
    sys.exit(
        1 if bad["lost_requests"] or bad["changed_tokens"] or bad["leaked_workers"] or bad["leaked_shm_segments"] else 0
    )


if __name__ == "__main__":
    main()
