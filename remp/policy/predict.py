"""What a topology would give the current load, from a performance model: the steady state of continuous
batching (running requests N, one iteration R in which each advances a token, the prompts arriving during R
prefilled alongside), its capacity, and its goodput under the SLOs. Pure functions."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from remp.policy.perf_model import Batch, PerfModel, iteration_s
from remp.topology import Shape, shape_name


@dataclass(frozen=True)
class Load:
    arrival_rate: float  # requests/s
    prompt_len: float  # mean prompt tokens
    output_len: float  # mean output tokens
    queue: float = 0  # requests waiting now
    running: float = 0
    rate_stderr: float = 0.0  # standard error of arrival_rate (a Poisson count over the window)


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class Prediction:
    topology: str
    ttft_s: float  # inf when the load exceeds the capacity
    tpot_s: float
    capacity_req_s: float
    slo_capacity_req_s: float  # the highest rate served within the SLOs
    goodput_req_s: float  # of the current load, within the SLOs

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in asdict(self).items()}


def _iteration(model: PerfModel, tp: int, pp: int, p: float, o: float, decode: float, prefill: float) -> float:
    """One iteration's seconds: `decode` running requests (split over the pp micro-batches) advance a token, and
    one micro-batch carries `prefill` prompt tokens (mean prompt p, output o)."""
    seqs = decode / pp + (math.ceil(prefill / p) if prefill else 0)
    kv = decode / pp * (p + o / 2) + prefill
    b = Batch(
        math.ceil(decode / pp + prefill),
        math.ceil(seqs),
        math.ceil(kv),
        math.ceil(kv - prefill + prefill * min(p, prefill) / 2),
        math.ceil(seqs),
    )
    busy = min(pp, max(1, math.ceil(decode) + (1 if prefill else 0)))  # micro-batches, one per stage
    return iteration_s(model, tp, pp, b) * model.busy_factor(tp, pp, busy)


def _mixed(model: PerfModel, tp: int, pp: int, p: float, o: float, n: float, x: float, limits: Limits) -> float:
    """An iteration with n running and x prompt tokens to prefill: heavy (a chunk aboard) and light ones in the
    proportion the prefill tokens need."""
    chunk = limits.max_num_batched_tokens / pp
    h = min(chunk, p)
    heavy, share = (h, x / h) if x <= h else (min(chunk, max(h, x / pp)), 1.0)
    return share * _iteration(model, tp, pp, p, o, n, heavy) + (1 - share) * _iteration(model, tp, pp, p, o, n, 0)


def _state(model: PerfModel, tp: int, pp: int, load: Load, rate: float, limits: Limits) -> tuple[float, float] | None:
    """(iteration seconds R, running N) at `rate`, or None where the topology cannot keep up.

    In an iteration every running request advances a token; the prompts that arrived meanwhile (X tokens) are
    prefilled in chunks of at most C = budget / pp per micro-batch. A micro-batch carrying a chunk is heavier,
    and in a pipeline the others wait behind it at every stage: such an iteration takes pp heavy stage times.
    So R mixes heavy and light iterations in the proportion the prefill tokens need. With fewer requests than
    stages the pipeline is partly idle, which on shared cores speeds the stages that work (busy_factor)."""
    p, o = max(load.prompt_len, 1.0), max(load.output_len, 1.0)
    max_running = min(limits.max_num_seqs, model.kv_capacity_tokens(tp, pp) / (p + o))
    r = _iteration(model, tp, pp, p, o, 1, 0)
    n = 0.0
    for _ in range(60):
        n = rate * r * (o + 1)  # Little's law: each request runs ~o iterations plus its prefill's
        x = rate * r * p  # prompt tokens arriving per iteration
        if n > max_running or x + n > limits.max_num_batched_tokens:
            return None
        nxt = _mixed(model, tp, pp, p, o, n, x, limits)
        if abs(nxt - r) < 1e-6 * r:
            break
        r = 0.5 * (r + nxt)
    return r, n


def step_time(model: PerfModel, shape: Shape, load: Load, running: float, limits: Limits) -> float:
    """The iteration time (a running request's TPOT) with `running` requests decoding (split over the replicas):
    each runs ~o + 1 iterations, so running / (o + 1) of them join per iteration, each with its prompt to
    prefill (whatever the queue: admissions keep pace with departures). The performance model's step times for
    the batch the scheduler has, without the queueing model: what the closed loop corrects the step times by."""
    tp, pp, dp = Shape(*shape)
    p, o = max(load.prompt_len, 1.0), max(load.output_len, 1.0)
    n = max(running / dp, 1.0)
    x = min(n * p / (o + 1), max(limits.max_num_batched_tokens - n, 0.0))
    return _mixed(model, tp, pp, p, o, n, x, limits)


def _bisect(ok, hi: float) -> float:
    """The largest rate in [0, hi] for which ok(rate) holds (assumed monotone)."""
    if ok(hi):
        return hi
    lo = 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _latencies(
    model: PerfModel, tp: int, pp: int, load: Load, rate: float, limits: Limits, capacity: float
) -> tuple[float, float] | None:
    """(TTFT, TPOT) at `rate`: the next scheduling point (R/2 on average), the prompt's chunks, queueing behind
    the others (M/M/1 with the capacity as service rate: arrivals are bursty, and admission waits for a whole
    request's share of the budget) and the backlog already waiting; None where the topology cannot keep up."""
    state = _state(model, tp, pp, load, rate, limits)
    if state is None:
        return None
    r, _ = state
    rho = min(rate / capacity, 0.99) if capacity > 0 else 0.0
    chunks = math.ceil(load.prompt_len * pp / limits.max_num_batched_tokens)  # a micro-batch's share of the budget
    ttft = r * (0.5 + chunks) + (rho / (1 - rho) + load.queue) / capacity if capacity > 0 else math.inf
    return ttft, r


@lru_cache(maxsize=65536)
def _capacities(
    model: PerfModel, tp: int, pp: int, p: float, o: float, limits: Limits, slo: Slo
) -> tuple[float, float]:
    """(capacity, SLO capacity) in requests/s for mean prompt p and output o."""
    load = Load(0.0, p, o)
    capacity = _bisect(lambda x: _state(model, tp, pp, load, x, limits) is not None, 1e4)
    if capacity <= 0:
        return 0.0, 0.0

    def meets(rate: float) -> bool:
        lat = _latencies(model, tp, pp, load, rate, limits, capacity)
        return lat is not None and lat[0] <= slo.ttft_s and lat[1] <= slo.tpot_s

    return capacity, _bisect(meets, capacity)


def _bucket(x: float) -> float:
    """Lengths rounded to 5% steps, so predictions for nearly the same mix are reused."""
    return round(1.05 ** round(math.log(max(x, 1.0)) / math.log(1.05)), 1)


def predict(model: PerfModel, shape: Shape, load: Load, limits: Limits, slo: Slo) -> Prediction:
    """`shape`'s steady state under `load`. Data-parallel replicas each take 1/dp of the arrivals (the router
    balances them) and of the queue; each is its own continuous batching of tp x pp workers."""
    tp, pp, dp = Shape(*shape)
    capacity, slo_capacity = _capacities(model, tp, pp, _bucket(load.prompt_len), _bucket(load.output_len), limits, slo)
    mine = replace(load, arrival_rate=load.arrival_rate / dp, queue=load.queue / dp, running=load.running / dp)
    now = _latencies(model, tp, pp, mine, min(mine.arrival_rate, capacity), limits, capacity) if capacity else None
    ttft, tpot = now if now is not None else (math.inf, math.inf)
    if mine.arrival_rate > capacity:
        ttft = math.inf  # the queue grows without bound
    return Prediction(
        topology=shape_name(shape),
        ttft_s=ttft,
        tpot_s=tpot,
        capacity_req_s=dp * capacity,
        slo_capacity_req_s=dp * slo_capacity,
        goodput_req_s=min(load.arrival_rate, dp * slo_capacity),
    )
