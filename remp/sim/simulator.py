"""The simulation loop. Requests arrive on a simulated clock; remp's Scheduler batches them exactly as in the
engine (continuous batching, chunked prefill, KV blocks, preemption, up to pp micro-batches in flight, each
taking its share of the running requests); a micro-batch occupies each pipeline stage for the performance
model's stage time, in order (pipeline.py; on shared CPU cores a stage slows while others work).

A data-parallel shape runs dp replicas, each its own Scheduler and pipeline on its own workers, and a router
(remp/router.py) in front gives each arriving request to one of them. A policy, when given, decides between
steps as in `remp serve`, and a switch costs what the planner says: live (pre-copy while serving slower, then a
pause), stop-the-world (one pause), or restart (a cold start, every running request recomputed). A switch that
changes dp hands each running request, with its KV, to the new replica the router picks (one whose pool holds
it; else it is preempted and recomputes) and re-routes the waiting ones. Deterministic: no randomness beyond
the workload's."""

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
from remp.router import ReplicaLoad, route
from remp.sampling_params import SamplingParams
from remp.scheduler import Scheduler
from remp.sim.pipeline import Pipeline
from remp.topology import Shape, parse_shape


@dataclass
class SimOptions:
    block_size: int = 16
    max_num_seqs: int = 256  # per replica, as each data-parallel engine has its own
    max_num_batched_tokens: int = 8192
    switch_mode: SwitchMode = LIVE  # how a policy's switch is carried out


@dataclass
class _Switch:
    target: Shape
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


class _Replica:
    """One data-parallel replica: its scheduler (block pool) and its pipeline of micro-batches."""

    def __init__(self, shape: Shape, scheduler: Scheduler, pipeline: Pipeline):
        self.shape, self.scheduler, self.pipeline = shape, scheduler, pipeline

    def load(self) -> ReplicaLoad:
        s = self.scheduler
        todo = sum(
            len(r.token_ids) - r.num_computed_tokens + r.max_tokens - r.num_output_tokens
            for q in (s.running, s.waiting)
            for r in q
        )
        return ReplicaLoad(todo, s.pool.num_free * s.block_size)

    def in_flight(self) -> set[Request]:
        return {r for sched, _ in self.pipeline.payloads() for r, _ in sched}


class Simulator:
    def __init__(
        self,
        perf: PerfModel,
        requests: list[SampleRequest],
        topology: Shape | tuple[int, ...],
        options: SimOptions,
        costs: SwitchCostModel,
        policy: TopologyPolicy | None = None,
        window: LoadWindow | None = None,
        schedule: list[tuple[float, Shape]] | None = None,
    ):
        self.perf, self.opts, self.costs, self.policy = perf, options, costs, policy
        self.window = window or LoadWindow()
        self.schedule = sorted((t, Shape(*s)) for t, s in schedule or [])  # switches at set times, as an operator's
        self.arrivals = sorted(requests, key=lambda r: r.arrival_s)
        self.shape = Shape(*topology)
        self.t = 0.0
        self.replicas = [self._replica(self.shape, 0.0) for _ in range(self.shape.dp)]
        self.resume_at = 0.0  # no micro-batch starts before (a switch's pause)
        self.switch: _Switch | None = None
        self.token_times: dict[Request, list[float]] = {}
        self.arrival_of: dict[Request, SampleRequest] = {}
        self.finished: list[Request] = []
        self.switches: list[dict] = []
        self.timeline = [(0.0, str(self.shape))]
        self.steps = 0

    @property
    def topology(self) -> Shape:
        return self.shape

    def _replica(self, shape: Shape, now: float) -> _Replica:
        tp, pp = shape.tp, shape.pp
        o = self.opts
        scheduler = Scheduler(self._num_blocks(shape), o.block_size, o.max_num_seqs, o.max_num_batched_tokens)
        return _Replica(shape, scheduler, Pipeline(pp, lambda active: self.perf.busy_factor(tp, pp, active), now))

    def _num_blocks(self, shape: Shape) -> int:
        blocks = self.perf.kv_capacity_tokens(shape.tp, shape.pp) // self.opts.block_size
        if blocks <= 0:
            raise ValueError(f"{shape}: the model's weights leave no memory for the KV cache")
        return blocks

    def _waiting(self) -> int:
        return sum(len(r.scheduler.waiting) for r in self.replicas)

    def _running(self) -> list[Request]:
        return [req for r in self.replicas for req in r.scheduler.running]

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        nxt = 0
        while True:
            while nxt < len(self.arrivals) and self.arrivals[nxt].arrival_s <= self.t:
                self._admit(self.arrivals[nxt], nxt)
                nxt += 1
            for rep in self.replicas:
                for _, sampled in rep.pipeline.advance(self.t):
                    self._complete(rep, sampled)
            self._advance_switch()
            if self.policy is not None and self.switch is None and self.policy.due(self.t) and self.t >= self.resume_at:
                self._decide()
            if self.schedule and self.switch is None and self.schedule[0][0] <= self.t:
                _, target = self.schedule.pop(0)
                if target != self.shape:
                    self.start_switch(target, "scheduled")
            self._submit()
            events = [e for rep in self.replicas if (e := rep.pipeline.next_event()) is not None]
            if nxt < len(self.arrivals):
                events.append(self.arrivals[nxt].arrival_s)
            if self.switch is not None:
                events.append(self.switch.precopy_end)
            if self.t < self.resume_at:
                events.append(self.resume_at)
            if self.schedule:
                events.append(self.schedule[0][0])
            busy = any(r.scheduler.has_unfinished() for r in self.replicas) or nxt < len(self.arrivals)
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
        self._route(req).scheduler.add(req)
        self.window.arrival(self.t, s.prompt_len, s.output_len)

    def _route(self, req: Request) -> _Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        return self.replicas[route([r.load() for r in self.replicas], req.num_prompt_tokens)]

    def _submit(self) -> None:
        draining = self.switch is not None and self.t >= self.switch.precopy_end
        if draining:
            return
        slow = 1.0 + (self.switch.slowdown if self.switch is not None else 0.0)
        for rep in self.replicas:
            tp, pp = rep.shape.tp, rep.shape.pp
            while len(rep.pipeline) < pp:
                batch = rep.scheduler.schedule(rep.in_flight(), pp)
                if not batch.scheduled:
                    break
                chunks, sampled = [], []
                for req, n in batch.scheduled:
                    done = req.num_computed_tokens + n == len(req.token_ids)
                    chunks.append((req.num_computed_tokens, n, done))
                    req.num_computed_tokens += n
                    if done:
                        sampled.append(req)
                work = Batch.of(chunks)
                stage_s, hop_s = self.perf.stage_s(tp, pp, work) * slow, self.perf.hop_s(tp, pp, work)
                rep.pipeline.submit((batch.scheduled, sampled), stage_s, hop_s, max(self.t, self.resume_at))
                self.steps += 1

    def _complete(self, rep: _Replica, sampled: list[Request]) -> None:
        done = self.t
        for req in sampled:
            req.token_ids.append(0)
            times = self.token_times[req]
            times.append(done)
            if req.num_output_tokens >= req.max_tokens:
                req.status = Status.FINISHED
                rep.scheduler.free(req)
                self.finished.append(req)
                s = self.arrival_of[req]
                tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
                self.window.finished(
                    done, req.num_output_tokens, times[0] - s.arrival_s, tpot, s.arrival_s, req.max_tokens
                )

    # --- switches -------------------------------------------------------------------------------------------

    def _decide(self) -> None:
        load = self.window.snapshot(self.t, self._waiting(), len(self._running()))
        if load is None:
            self.policy.next_t = self.t + self.policy.config.interval_s
            return
        observed = self.window.observe(self.t, self.policy.observe_from, self.policy.config.slo)
        d = self.policy.decide(self.t, load, self.shape, observed)
        if d.action == "switch":
            self.start_switch(parse_shape(d.target), d.reason)

    def start_switch(self, target: Shape, reason: str = "") -> None:
        target = Shape(*target)
        mode = self.opts.switch_mode
        running = self._running()
        used = sum(len(r.block_ids) for r in running)
        clean = {r: r.num_computed_tokens // self.opts.block_size for r in running}
        cost = self.costs.cost(self.shape, target, mode, used, dirty_blocks=used - sum(clean.values()))
        self.switch = _Switch(
            target, self.t + cost.precopy_s, cost.pause_s, cost.precopy_s, cost.slowdown, self.t, reason, clean
        )

    def _advance_switch(self) -> None:
        sw = self.switch
        if sw is None or self.t < sw.precopy_end or any(len(r.pipeline) for r in self.replicas):
            return
        mode, old = self.opts.switch_mode, self.shape
        pause = sw.pause_s
        if mode.precopy:  # blocks written since the pre-copy began (and new requests' blocks) move now
            running = self._running()
            dirty = max(0, sum(len(r.block_ids) for r in running) - sum(sw.clean_blocks.get(r, 0) for r in running))
            pause = self.costs.cost(old, sw.target, mode, dirty, dirty_blocks=dirty).pause_s
        if old.dp == sw.target.dp:
            preempted = self._reshape(sw.target, mode)
        else:
            preempted = self._regroup(sw.target, mode)
        self.shape = sw.target
        self.resume_at = self.t + pause
        self.switches.append(
            {
                "time": round(sw.started, 3),
                "from": str(old),
                "to": str(sw.target),
                "mode": mode.name,
                "precopy_s": round(sw.precopy_s, 4),
                "pause_s": round(pause, 4),
                "preempted": preempted,
                "reason": sw.reason,
            }
        )
        self.timeline.append((self.t + pause, str(sw.target)))
        self.switch = None
        if self.policy is not None:
            self.policy.switched(self.t + pause)

    def _reshape(self, target: Shape, mode: SwitchMode) -> int:
        """Same dp: replica i becomes replica i of the new shape, keeping its requests (and KV, unless restarted)."""
        preempted = 0
        for i, rep in enumerate(self.replicas):
            blocks = self._num_blocks(target)
            preempted += len(rep.scheduler.fit(0 if mode.restarts else blocks))
            in_use = [b for r in rep.scheduler.running for b in r.block_ids]
            # the real engine renames blocks past a smaller pool's end onto free ids; so does this
            free = iter(sorted(set(range(blocks)) - set(in_use)))
            rep.scheduler.resize(blocks, {b: next(free) for b in in_use if b >= blocks})
            fresh = self._replica(target, self.t)
            self.replicas[i] = _Replica(fresh.shape, rep.scheduler, fresh.pipeline)
        return preempted

    def _regroup(self, target: Shape, mode: SwitchMode) -> int:
        """Another dp: new replicas; each running request (oldest first) moves with its KV to the replica the
        router picks among those whose pool holds it (recomputed, if none does or the switch restarts), then the
        waiting ones are routed, those preempted first, as a preempted request goes to the front of its queue."""
        running = sorted(self._running(), key=lambda r: int(r.request_id))
        waiting = sorted((q for rep in self.replicas for q in rep.scheduler.waiting), key=lambda r: int(r.request_id))
        self.replicas = [self._replica(target, self.t) for _ in range(target.dp)]
        requeue = []
        for req in running:
            need = len(req.block_ids)
            loads = [r.load() for r in self.replicas]
            i = route(loads, need * self.opts.block_size)
            s = self.replicas[i].scheduler
            blocks = (
                None
                if mode.restarts or loads[i].free_kv_tokens < need * self.opts.block_size
                else s.pool.allocate(need)
            )
            if blocks is None:
                req.block_ids, req.num_computed_tokens, req.status = [], 0, Status.WAITING
                req.num_preemptions += 1
                requeue.append(req)
            else:
                req.block_ids = blocks
                s.running.append(req)
        for req in requeue + waiting:
            self._route(req).scheduler.add(req)
        return len(requeue)

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
