"""The simulation loop. Requests arrive on a simulated clock; remp's Scheduler batches them exactly as in the
engine (continuous batching, chunked prefill, KV blocks, preemption, up to pp micro-batches in flight, each
taking its share of the running requests); a micro-batch occupies each pipeline stage for the performance
model's stage time, in order (pipeline.py; on shared CPU cores a stage slows while others work). A policy, when given, decides between steps as in `remp serve`, and a switch costs what the planner
says: live (pre-copy while serving slower, then a pause), stop-the-world (one pause), or restart (a cold start,
every running request recomputed). Deterministic: no randomness beyond the workload's."""

from __future__ import annotations

from dataclasses import dataclass, field

from remp.bench.datasets import SampleRequest
from remp.bench.metrics import RequestResult
from remp.planner.mode import LIVE, SwitchMode
from remp.policy.decide import TopologyPolicy
from remp.policy.observe import LoadWindow
from remp.policy.perf_model import Batch, PerfModel
from remp.policy.switch_cost import SwitchCostModel
from remp.request import Request, Status
from remp.sampling_params import SamplingParams
from remp.scheduler import Scheduler
from remp.sim.pipeline import Pipeline
from remp.topology import parse_shape, shape_name


@dataclass
class SimOptions:
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    switch_mode: SwitchMode = LIVE  # how a policy's switch is carried out


@dataclass
class _Switch:
    target: tuple[int, int]
    precopy_end: float
    pause_s: float
    precopy_s: float
    slowdown: float
    started: float
    reason: str
    clean_blocks: dict[Request, int] = field(default_factory=dict)  # full blocks when the pre-copy began


@dataclass
class SimResult:
    results: list[RequestResult]
    duration_s: float
    switches: list[dict]
    decisions: list[dict]
    topology_timeline: list[tuple[float, str]]
    steps: int


class Simulator:
    def __init__(
        self,
        perf: PerfModel,
        requests: list[SampleRequest],
        topology: tuple[int, int],
        options: SimOptions,
        costs: SwitchCostModel,
        policy: TopologyPolicy | None = None,
        window: LoadWindow | None = None,
        schedule: list[tuple[float, tuple[int, int]]] | None = None,
    ):
        self.perf, self.opts, self.costs, self.policy = perf, options, costs, policy
        self.window = window or LoadWindow()
        self.schedule = sorted(schedule or [])  # (time, topology): switches at set times, as an operator would
        self.arrivals = sorted(requests, key=lambda r: r.arrival_s)
        self.topology = topology
        self.scheduler = Scheduler(
            self._num_blocks(topology), options.block_size, options.max_num_seqs, options.max_num_batched_tokens
        )
        self.t = 0.0
        self.pipeline = self._pipeline(topology, 0.0)  # micro-batches in flight: (scheduled, sampled)
        self.resume_at = 0.0  # no micro-batch starts before (a switch's pause)
        self.switch: _Switch | None = None
        self.token_times: dict[Request, list[float]] = {}
        self.arrival_of: dict[Request, SampleRequest] = {}
        self.finished: list[Request] = []
        self.switches: list[dict] = []
        self.timeline = [(0.0, shape_name(topology))]
        self.steps = 0

    def _pipeline(self, topology: tuple[int, int], now: float) -> Pipeline:
        tp, pp = topology
        return Pipeline(pp, lambda active: self.perf.busy_factor(tp, pp, active), now)

    def _num_blocks(self, topology: tuple[int, int]) -> int:
        blocks = self.perf.kv_capacity_tokens(*topology) // self.opts.block_size
        if blocks <= 0:
            raise ValueError(f"{shape_name(topology)}: the model's weights leave no memory for the KV cache")
        return blocks

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        nxt = 0
        while True:
            while nxt < len(self.arrivals) and self.arrivals[nxt].arrival_s <= self.t:
                self._admit(self.arrivals[nxt], nxt)
                nxt += 1
            for scheduled, sampled in self.pipeline.advance(self.t):
                self._complete(scheduled, sampled)
            self._advance_switch()
            if self.policy is not None and self.switch is None and self.policy.due(self.t) and self.t >= self.resume_at:
                self._decide()
            if self.schedule and self.switch is None and self.schedule[0][0] <= self.t:
                _, target = self.schedule.pop(0)
                if target != self.topology:
                    self.start_switch(target, "scheduled")
            self._submit()
            events = [e for e in [self.pipeline.next_event()] if e is not None]
            if nxt < len(self.arrivals):
                events.append(self.arrivals[nxt].arrival_s)
            if self.switch is not None:
                events.append(self.switch.precopy_end)
            if self.t < self.resume_at:
                events.append(self.resume_at)
            if self.schedule:
                events.append(self.schedule[0][0])
            busy = self.scheduler.has_unfinished() or nxt < len(self.arrivals)
            if self.policy is not None and busy:
                events.append(self.policy.next_t)
            later = [e for e in events if e > self.t]
            if not later:  # done, or what is left can never be scheduled (e.g. longer than the KV cache): failed
                break
            self.t = min(later)
        duration = max((self.token_times[r][-1] for r in self.finished), default=0.0)
        return SimResult(
            [self._result(r) for r in self.arrival_of],
            duration,
            self.switches,
            [d.to_json() for d in self.policy.decisions] if self.policy else [],
            self.timeline,
            self.steps,
        )

    def _admit(self, s: SampleRequest, i: int) -> None:
        req = Request(
            request_id=str(i),
            prompt=None,
            prompt_token_ids=[0] * s.prompt_len,
            params=SamplingParams(max_tokens=s.output_len, ignore_eos=True),
            max_tokens=s.output_len,
        )
        self.arrival_of[req] = s
        self.token_times[req] = []
        self.scheduler.add(req)
        self.window.arrival(self.t, s.prompt_len, s.output_len)

    def _submit(self) -> None:
        tp, pp = self.topology
        draining = self.switch is not None and self.t >= self.switch.precopy_end
        while not draining and len(self.pipeline) < pp:
            busy = {r for sched, _ in self.pipeline.payloads() for r, _ in sched}
            batch = self.scheduler.schedule(busy, pp)
            if not batch.scheduled:
                return
            chunks, sampled = [], []
            for req, n in batch.scheduled:
                done = req.num_computed_tokens + n == len(req.token_ids)
                chunks.append((req.num_computed_tokens, n, done))
                req.num_computed_tokens += n
                if done:
                    sampled.append(req)
            work = Batch.of(chunks)
            slow = 1.0 + (self.switch.slowdown if self.switch is not None else 0.0)
            stage_s, hop_s = self.perf.stage_s(tp, pp, work) * slow, self.perf.hop_s(tp, work)
            self.pipeline.submit((batch.scheduled, sampled), stage_s, hop_s, max(self.t, self.resume_at))
            self.steps += 1

    def _complete(self, scheduled: list[tuple[Request, int]], sampled: list[Request]) -> None:
        done = self.t
        for req in sampled:
            req.token_ids.append(0)
            times = self.token_times[req]
            times.append(done)
            if req.num_output_tokens >= req.max_tokens:
                req.status = Status.FINISHED
                self.scheduler.free(req)
                self.finished.append(req)
                s = self.arrival_of[req]
                tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
                self.window.finished(done, req.num_output_tokens, times[0] - s.arrival_s, tpot)

    # --- switches -------------------------------------------------------------------------------------------

    def _decide(self) -> None:
        load = self.window.snapshot(self.t, len(self.scheduler.waiting), len(self.scheduler.running))
        if load is None:
            self.policy.next_t = self.t + self.policy.config.interval_s
            return
        d = self.policy.decide(self.t, load, self.topology)
        if d.action == "switch":
            self.start_switch(parse_shape(d.target), d.reason)

    def start_switch(self, target: tuple[int, int], reason: str = "") -> None:
        mode = self.opts.switch_mode
        used = sum(len(r.block_ids) for r in self.scheduler.running)
        clean = {r: r.num_computed_tokens // self.opts.block_size for r in self.scheduler.running}
        cost = self.costs.cost(self.topology, target, mode, used, dirty_blocks=used - sum(clean.values()))
        self.switch = _Switch(
            target, self.t + cost.precopy_s, cost.pause_s, cost.precopy_s, cost.slowdown, self.t, reason, clean
        )

    def _advance_switch(self) -> None:
        sw = self.switch
        if sw is None or self.t < sw.precopy_end or len(self.pipeline):
            return
        mode, old = self.opts.switch_mode, self.topology
        pause = sw.pause_s
        if mode.precopy:  # blocks written since the pre-copy began (and new requests' blocks) move now
            running = self.scheduler.running
            dirty = max(0, sum(len(r.block_ids) for r in running) - sum(sw.clean_blocks.get(r, 0) for r in running))
            pause = self.costs.cost(old, sw.target, mode, dirty, dirty_blocks=dirty).pause_s
        blocks = self._num_blocks(sw.target)
        preempted = self.scheduler.fit(0 if mode.restarts else blocks)
        self._rename_blocks(blocks)
        self.topology = sw.target
        self.pipeline = self._pipeline(sw.target, self.t)
        self.resume_at = self.t + pause
        self.switches.append(
            {
                "time": round(sw.started, 3),
                "from": shape_name(old),
                "to": shape_name(sw.target),
                "mode": mode.name,
                "precopy_s": round(sw.precopy_s, 4),
                "pause_s": round(pause, 4),
                "preempted": len(preempted),
                "reason": sw.reason,
            }
        )
        self.timeline.append((self.t + pause, shape_name(sw.target)))
        self.switch = None
        if self.policy is not None:
            self.policy.switched(self.t + pause)

    def _rename_blocks(self, num_blocks: int) -> None:
        """The real engine renames blocks past a smaller pool's end onto free ids; so does this."""
        in_use = [b for r in self.scheduler.running for b in r.block_ids]
        free = iter(sorted(set(range(num_blocks)) - set(in_use)))
        mapping = {b: next(free) for b in in_use if b >= num_blocks}
        self.scheduler.resize(num_blocks, mapping)

    # --- results --------------------------------------------------------------------------------------------

    def _result(self, req: Request) -> RequestResult:
        s, times = self.arrival_of[req], self.token_times[req]
        ok = req.status is Status.FINISHED
        return RequestResult(
            index=int(req.request_id),
            phase=s.phase,
            success=ok,
            error="" if ok else "not served (did not fit the KV cache, or the run ended)",
            send_time=s.arrival_s,
            ttft=times[0] - s.arrival_s if times else 0.0,
            latency=times[-1] - s.arrival_s if times else 0.0,
            itl=[b - a for a, b in zip(times, times[1:])],
            prompt_tokens=s.prompt_len,
            output_tokens=len(times),
            expected_output_tokens=s.output_len,
        )
