"""How much adapting could pay on a workload: the best piecewise-constant schedule in hindsight. Time is cut
into windows; each candidate's fixed run says how many requests arriving in each window it served within the
SLOs; a dynamic programme over windows x candidates (switches at window starts, each losing what the switch
cost model says it hurts) finds the schedule with the most good requests. The schedule is then simulated like
any other (`--schedule`), so its reported goodput carries everything the per-window values leave out (the
backlog a topology inherits, the switch itself); the oracle is the better of that run and the best fixed one
(itself a schedule)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from remp.bench.metrics import RequestResult, meets_slos
from remp.planner.mode import SwitchMode
from remp.policy.switch_cost import SwitchCostModel
from remp.topology import Shape


def best_schedule(
    values: dict[Shape, Sequence[float]], cost: Callable[[Shape, Shape, int], float]
) -> tuple[float, list[Shape]]:
    """The schedule (a candidate per window) maximising the sum of `values[c][w]` less `cost(a, b, w)` for each
    switch a -> b at the start of window w, and its value. Exact (Viterbi); ties keep the topology, then
    take the earlier candidate."""
    shapes = list(values)
    n = len(next(iter(values.values()), []))
    if n == 0:
        return 0.0, []
    best = {c: float(values[c][0]) for c in shapes}
    back: list[dict[Shape, Shape]] = []
    for w in range(1, n):
        step, prev = {}, {}
        for c in shapes:
            options = [(best[c], 0, c)] + [(best[a] - cost(a, c, w), 1 + shapes.index(a), a) for a in shapes if a != c]
            v, _, a = max(options, key=lambda o: (o[0], -o[1]))
            step[c], prev[c] = v + float(values[c][w]), a
        best = step
        back.append(prev)
    last = max(shapes, key=lambda c: (best[c], -shapes.index(c)))
    path = [last]
    for prev in reversed(back):
        path.append(prev[path[-1]])
    return best[last], path[::-1]


def window_values(results: list[RequestResult], window_s: float, windows: int, slos_ms: dict) -> list[float]:
    """Good requests by the window they arrived in."""
    out = [0.0] * windows
    for r in results:
        if meets_slos(r, slos_ms):
            out[min(int(r.send_time // window_s), windows - 1)] += 1
    return out


def window_concurrency(results: list[RequestResult], window_s: float, windows: int) -> list[tuple[float, float]]:
    """(arrival rate, requests in flight) by window, from a run's results (Little's law: rate x latency)."""
    rate = [0.0] * windows
    busy = [0.0] * windows
    for r in results:
        w = min(int(r.send_time // window_s), windows - 1)
        rate[w] += 1 / window_s
        busy[w] += (r.latency if r.success else window_s) / window_s
    return list(zip(rate, busy))


def switch_loss(
    costs: SwitchCostModel,
    mode: SwitchMode,
    slo_ttft_s: float,
    block_tokens: float,
    block_size: int,
    load: Sequence[tuple[float, float]],
) -> Callable[[Shape, Shape, int], float]:
    """Good requests a switch a -> b at window w's start loses, as the policy counts them: those in flight or
    arriving during the pause, as far as the pause eats their TTFT budget, and those arriving while a pre-copy
    slows serving. `load[w]`: (arrival rate, requests in flight); each holds ~`block_tokens` of KV."""

    def loss(a: Shape, b: Shape, w: int) -> float:
        rate, running = load[w]
        blocks = int(running * block_tokens / block_size)
        c = costs.cost(a, b, mode, blocks)
        share = min(1.0, c.pause_s / slo_ttft_s)
        return (running + rate * c.pause_s) * share + rate * c.precopy_s * c.slowdown

    return loss
