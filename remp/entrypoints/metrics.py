"""Prometheus metrics of the server, named like vLLM's under a `remp:` prefix, plus topology switches."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from remp.engine import LLMEngine
from remp.logger import init_logger
from remp.outputs import RequestOutput
from remp.switch.report import SwitchReport
from remp.topology import Topology

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

logger = init_logger(__name__)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = {"labelnames": ["model_name"]}
        self.running = Gauge("remp:num_requests_running", "Requests in the running batch", registry=r, **label)
        self.waiting = Gauge("remp:num_requests_waiting", "Requests waiting to be scheduled", registry=r, **label)
        self.kv_usage = Gauge(
            "remp:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)", registry=r, **label
        )
        self.preemptions = Counter(
            "remp:num_preemptions", "Requests preempted (their KV freed, to recompute later)", registry=r, **label
        )
        self.prompt_tokens = Counter("remp:prompt_tokens", "Prefill tokens processed", registry=r, **label)
        self.generation_tokens = Counter("remp:generation_tokens", "Tokens generated", registry=r, **label)
        self.success = Counter(
            "remp:request_success", "Finished requests", registry=r, labelnames=["model_name", "finished_reason"]
        )
        self.ttft = Histogram(
            "remp:time_to_first_token_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS, **label
        )
        self.tpot = Histogram(
            "remp:time_per_output_token_seconds",
            "Mean time per output token of a request",
            registry=r,
            buckets=LATENCY_BUCKETS,
            **label,
        )
        self.e2e = Histogram(
            "remp:e2e_request_latency_seconds", "Request latency", registry=r, buckets=LATENCY_BUCKETS, **label
        )
        self.itl = Histogram(
            "remp:inter_token_latency_seconds",
            "Time between two tokens of a request, each pair",
            registry=r,
            buckets=LATENCY_BUCKETS,
            **label,
        )
        phases = {
            "queue": "arrival to its first scheduling (waiting)",
            "prefill": "first scheduling to its first token",
            "decode": "first token to its last",
            "inference": "first scheduling to its last token (prefill and decode)",
        }
        self.phase_time = {
            name: Histogram(
                f"remp:request_{name}_time_seconds",
                f"A request's time from {doc}",
                registry=r,
                buckets=LATENCY_BUCKETS,
                **label,
            )  # fmt: skip
            for name, doc in phases.items()
        }
        self.switches = Counter(
            "remp:topology_switches", "Topology switches", registry=r, labelnames=["model_name", "mode"]
        )
        self.switch_duration = Histogram(
            "remp:topology_switch_duration_seconds",
            "Wall time of a switch",
            registry=r,
            buckets=LATENCY_BUCKETS,
            **label,
        )
        self.switch_pause = Histogram(
            "remp:topology_switch_pause_seconds",
            "Time no step ran during a switch",
            registry=r,
            buckets=LATENCY_BUCKETS,
            **label,
        )
        self.aborted = Counter(
            "remp:request_aborted",
            "Requests ended before they finished: the client went away, or the server shut down",
            registry=r,
            labelnames=["model_name", "reason"],
        )
        self.dp = Gauge("remp:data_parallel_size", "Current data parallel size (replicas)", registry=r, **label)
        self.tp = Gauge("remp:tensor_parallel_size", "Current tensor parallel size", registry=r, **label)
        self.pp = Gauge("remp:pipeline_parallel_size", "Current pipeline parallel size", registry=r, **label)
        self.pool = Gauge("remp:num_workers", "Worker processes in the pool", registry=r, **label)
        self.generation = Gauge(
            "remp:pool_generation", "Changes of the pool's size (each a new process-group world)", registry=r, **label
        )
        self.worker_failures = Counter(
            "remp:worker_failures_total", "Worker processes lost while serving", registry=r, **label
        )
        self.recoveries = Counter(
            "remp:recoveries_total", "Switches onto the surviving (or replacement) workers", registry=r, **label
        )
        self.recovery_seconds = Histogram(
            "remp:recovery_seconds",
            "From a worker's loss until the engine could step again",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            **label,
        )
        self.requests_recomputed = Counter(
            "remp:requests_recomputed_total",
            "Requests whose KV was recomputed after a lost worker",
            registry=r,
            **label,
        )
        self.policy_decisions = Counter(
            "remp:topology_policy_decisions",
            "Decisions of the topology policy (--topology-policy auto): stay or switch",
            registry=r,
            labelnames=["model_name", "action"],
        )
        self.prefix_queries = Counter(
            "remp:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r, **label
        )
        self.prefix_hits = Counter(
            "remp:prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV reused)", registry=r, **label
        )
        self._prefix_seen = (0, 0)
        self._preemptions_seen = 0
        self._last_token: dict[str, float] = {}  # request id -> when its last token was seen (ITL)
        self.stats_log = StatsLog()
        self._reports_seen = 0
        self._decisions_seen: dict[str, int] = {}
        self.model = model_name

    def watch(self, engine: LLMEngine) -> None:
        """Scheduler gauges are read at scrape time, so they are current even when no step runs (after aborts)."""
        m = self.model
        schedulers = lambda: [rep.scheduler for rep in engine.replicas]
        self.running.labels(m).set_function(lambda: sum(len(s.running) for s in schedulers()))
        self.waiting.labels(m).set_function(lambda: sum(len(s.waiting) for s in schedulers()))
        self.kv_usage.labels(m).set_function(
            lambda: sum(s.pool.num_used for s in schedulers()) / sum(s.pool.num_blocks for s in schedulers())
        )
        self.registry.register(ReplicaCollector(engine, m))
        self.pool.labels(m).set_function(lambda: getattr(engine.executor, "pool_size", 1))
        self.generation.labels(m).set_function(lambda: getattr(engine.executor, "generation", 0))

    def _count_policy(self, engine: LLMEngine) -> None:
        if engine.policy is None:
            return
        for action, n in engine.policy.policy.counts.items():
            seen = self._decisions_seen.get(action, 0)
            if n > seen:
                self.policy_decisions.labels(self.model, action).inc(n - seen)
                self._decisions_seen[action] = n

    def on_abort(self, reason: str) -> None:
        self.aborted.labels(self.model, reason).inc()

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        """Called on the engine thread after every step."""
        m = self.model
        reports = engine.stats.switches
        for report in reports[self._reports_seen :]:
            if report.cause == "worker_lost":
                self.worker_failures.labels(m).inc(len(report.lost_workers))
                self.recoveries.labels(m).inc()
                self.recovery_seconds.labels(m).observe(report.wall_s)
                self.requests_recomputed.labels(m).inc(len(report.preempted))
                self.on_topology(engine.topology)
            elif report.cause == "policy":
                self.on_topology(engine.topology, report)
        self._reports_seen = len(reports)
        self._count_policy(engine)
        schedulers = [rep.scheduler for rep in engine.replicas]
        pools, (queries, hits) = [s.pool for s in schedulers], self._prefix_seen
        now = (sum(p.queries for p in pools), sum(p.hits for p in pools))
        self.prefix_queries.labels(m).inc(now[0] - queries)
        self.prefix_hits.labels(m).inc(now[1] - hits)
        self._prefix_seen = now
        preemptions = sum(s.num_preemptions for s in schedulers)
        self.preemptions.labels(m).inc(max(0, preemptions - self._preemptions_seen))
        self._preemptions_seen = preemptions
        self.generation_tokens.labels(m).inc(len(outputs))
        t = time.time()
        for out in outputs:
            met = out.metrics
            if len(out.outputs[0].token_ids) == 1:
                self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
                if met and met.first_token_time:
                    self.ttft.labels(m).observe(met.first_token_time - met.arrival_time)
            elif out.request_id in self._last_token:
                self.itl.labels(m).observe(t - self._last_token[out.request_id])
            self._last_token[out.request_id] = t
            if out.finished:
                self._last_token.pop(out.request_id, None)
            if out.finished and met and met.finished_time:
                self.success.labels(m, out.outputs[0].finish_reason).inc()
                self.e2e.labels(m).observe(met.finished_time - met.arrival_time)
                n = len(out.outputs[0].token_ids)
                if n > 1 and met.first_token_time:
                    self.tpot.labels(m).observe((met.finished_time - met.first_token_time) / (n - 1))
                self._phases(met)
        self.stats_log.step(engine, len(outputs))

    def _phases(self, met) -> None:
        scheduled, first, done = met.first_scheduled_time, met.first_token_time, met.finished_time
        if scheduled is None or first is None:
            return
        for name, seconds in (
            ("queue", scheduled - met.arrival_time),
            ("prefill", first - scheduled),
            ("decode", done - first),
            ("inference", done - scheduled),
        ):
            self.phase_time[name].labels(self.model).observe(max(0.0, seconds))

    def on_topology(self, topology: Topology, report: SwitchReport | None = None) -> None:
        self.dp.labels(self.model).set(topology.dp)
        self.tp.labels(self.model).set(topology.tp)
        self.pp.labels(self.model).set(topology.pp)
        if report is not None:
            self.switches.labels(self.model, report.mode).inc()
            self.switch_duration.labels(self.model).observe(report.wall_s)
            self.switch_pause.labels(self.model).observe(report.pause_s)


class ReplicaCollector:
    """Per-replica gauges, read at scrape time from the replicas there are now (a switch changes them)."""

    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.model = engine, model_name

    def collect(self):
        names = ["model_name", "replica"]
        running = GaugeMetricFamily("remp:replica_num_requests_running", "Running requests of a replica", labels=names)
        waiting = GaugeMetricFamily("remp:replica_num_requests_waiting", "Waiting requests of a replica", labels=names)
        usage = GaugeMetricFamily("remp:replica_kv_cache_usage_perc", "KV blocks in use of a replica", labels=names)
        for i, rep in enumerate(list(self.engine.replicas)):
            s, labels = rep.scheduler, [self.model, str(i)]
            running.add_metric(labels, len(s.running))
            waiting.add_metric(labels, len(s.waiting))
            usage.add_metric(labels, s.pool.usage)
        return [running, waiting, usage]


class StatsLog:
    """vLLM's periodic stats line, every `interval_s` while the engine steps: prompt and generation throughput,
    running and waiting requests, KV cache usage, prefix cache hit rate."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s, self.t0 = interval_s, time.monotonic()
        self.generated = 0
        self.prompt0 = self.queries0 = self.hits0 = 0

    def step(self, engine: LLMEngine, outputs: int) -> None:
        self.generated += outputs
        now = time.monotonic()
        if now - self.t0 < self.interval_s:
            return
        schedulers = [rep.scheduler for rep in engine.replicas]
        pools = [s.pool for s in schedulers]
        queries, hits = sum(p.queries for p in pools), sum(p.hits for p in pools)
        prompt = engine.stats.prompt_tokens
        span = now - self.t0
        hit_rate = (hits - self.hits0) / (queries - self.queries0) if queries > self.queries0 else 0.0
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
            "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            (prompt - self.prompt0) / span,
            self.generated / span,
            sum(len(s.running) for s in schedulers),
            sum(len(s.waiting) for s in schedulers),
            100 * sum(p.num_used for p in pools) / sum(p.num_blocks for p in pools),
            100 * hit_rate,
        )
        self.t0, self.generated, self.prompt0, self.queries0, self.hits0 = now, 0, prompt, queries, hits
