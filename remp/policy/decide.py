"""The topology policy: every few seconds, predict each candidate topology's goodput and latency under the
current load, and switch only when the gain over a horizon exceeds the switch's cost, the current topology
has been kept for a minimum dwell time, and the same candidate has won `patience` times in a row."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from remp.planner.mode import SwitchCost
from remp.policy.perf_model import PerfModel
from remp.policy.predict import Limits, Load, Prediction, Slo, predict
from remp.topology import shape_name


@dataclass(frozen=True)
class PolicyConfig:
    slo: Slo
    interval_s: float = 5.0  # how often to decide
    min_dwell_s: float = 60.0  # at least this long on a topology before leaving it
    horizon_s: float = 120.0  # how long a decision is expected to pay off
    gain_threshold: float = 0.1  # goodput must rise by this fraction
    latency_threshold: float = 0.2  # or, goodput equal, latency must fall by this fraction
    patience: int = 2  # consecutive wins before switching


@dataclass
class Decision:
    time: float
    action: str  # "stay" or "switch"
    current: str
    target: str
    reason: str
    load: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__.copy()


def horizon_goodput(p: Prediction, load: Load, horizon_s: float, slo: Slo) -> float:
    """Goodput over the horizon, counting the backlog: requests already queued longer than the TTFT SLO allows
    keep newcomers waiting past it until the queue drains at capacity minus arrivals (never, if overloaded)."""
    rate, cap, q = load.arrival_rate, p.capacity_req_s, load.queue
    good = min(rate, p.slo_capacity_req_s)
    if cap <= 0:
        return 0.0
    if rate < cap:
        if q / cap <= slo.ttft_s:
            return good
        bad_s = (q - slo.ttft_s * cap) / (cap - rate)  # until waits are back under the SLO
        return good * max(0.0, horizon_s - bad_s) / horizon_s
    ok_s = max(0.0, (slo.ttft_s * cap - q) / (rate - cap))  # until the growing wait passes the SLO
    return good * min(ok_s, horizon_s) / horizon_s


def latency_score(p: Prediction, slo: Slo) -> float:
    """TTFT and TPOT as fractions of their SLOs, summed: lower is better."""
    return p.ttft_s / slo.ttft_s + p.tpot_s / slo.tpot_s


class TopologyPolicy:
    def __init__(
        self,
        model: PerfModel,
        candidates: list[tuple[int, int]],
        limits: Limits,
        config: PolicyConfig,
        switch_cost: Callable[[tuple[int, int], tuple[int, int]], SwitchCost],
    ):
        if not candidates:
            raise ValueError("the topology policy needs at least one candidate topology")
        self.model, self.candidates, self.limits, self.config = model, list(candidates), limits, config
        self.switch_cost = switch_cost
        self.decisions: deque[Decision] = deque(maxlen=200)
        self.counts = {"stay": 0, "switch": 0}
        self.last_switch_t = -math.inf
        self.next_t = 0.0
        self._streak: tuple[str, int] = ("", 0)

    def due(self, now: float) -> bool:
        return now >= self.next_t

    def switched(self, now: float) -> None:
        """A switch happened (by this policy or anyone else): the dwell time starts again."""
        self.last_switch_t = now
        self._streak = ("", 0)

    def decide(self, now: float, load: Load, current: tuple[int, int]) -> Decision:
        self.next_t = now + self.config.interval_s
        slo = self.config.slo
        # plan for the upper end of the measured rate: a topology at the edge of its capacity under the mean rate
        # overflows in the next burst (and the policy would switch back and forth)
        load = replace(load, arrival_rate=load.arrival_rate + 2 * load.rate_stderr, rate_stderr=0.0)
        preds = {c: predict(self.model, *c, load, self.limits, slo) for c in {*self.candidates, current}}
        good = {c: horizon_goodput(p, load, self.config.horizon_s, slo) for c, p in preds.items()}
        cur = preds[current]
        best = max(self.candidates, key=lambda c: (round(good[c], 3), -latency_score(preds[c], slo)))
        target, reason = self._weigh(now, load, current, best, preds, good)
        if target != current:
            name = shape_name(target)
            streak = self._streak[1] + 1 if self._streak[0] == name else 1
            self._streak = (name, streak)
            if streak < self.config.patience:
                reason = f"{reason}; waiting for {self.config.patience - streak} more confirmation(s)"
                target = current
        else:
            self._streak = ("", 0)
        d = Decision(
            time=now,
            action="switch" if target != current else "stay",
            current=cur.topology,
            target=shape_name(target),
            reason=reason,
            load=load.__dict__.copy(),
            predictions=[preds[c].to_json() | {"horizon_goodput_req_s": round(good[c], 4)} for c in sorted(preds)],
        )
        self.counts[d.action] += 1
        self.decisions.append(d)
        if d.action == "switch":
            self.switched(now)
        return d

    def _weigh(
        self, now: float, load: Load, current: tuple[int, int], best: tuple[int, int], preds: dict, good: dict
    ) -> tuple[tuple[int, int], str]:
        cfg, slo = self.config, self.config.slo
        cur, new = preds[current], preds[best]
        if best == current:
            return current, f"{cur.topology} is the best candidate"
        if now - self.last_switch_t < cfg.min_dwell_s:
            return (
                current,
                f"{new.topology} would be better but the dwell time has {cfg.min_dwell_s - (now - self.last_switch_t):.0f} s left",
            )
        cost = self.switch_cost(current, best)
        # requests whose latency the switch hurts: those running and arriving during the pause and pre-copy
        hurt = load.running + load.arrival_rate * (cost.pause_s + cost.precopy_s * cost.slowdown)
        gain = (good[best] - good[current]) * cfg.horizon_s
        if good[best] > good[current] * (1 + cfg.gain_threshold):
            if gain > hurt:
                return best, (
                    f"goodput {good[current]:.2f} -> {good[best]:.2f} req/s: +{gain:.0f} good requests "
                    f"over {cfg.horizon_s:.0f} s against ~{hurt:.0f} hurt by a {cost.pause_s * 1e3:.0f} ms pause"
                )
            return (
                current,
                f"{new.topology}'s goodput gain (+{gain:.0f} requests) does not pay for the switch (~{hurt:.0f})",
            )
        # goodput equal: lower latency, if the request-seconds saved exceed those the switch costs
        old_s, new_s = latency_score(cur, slo), latency_score(new, slo)
        if math.isfinite(old_s) and new_s < old_s * (1 - cfg.latency_threshold):
            per_request = load.output_len * (cur.tpot_s - new.tpot_s) + (cur.ttft_s - new.ttft_s)
            saved = load.arrival_rate * cfg.horizon_s * per_request
            lost = hurt * cost.pause_s + load.running * cost.precopy_s * cost.slowdown * cur.tpot_s
            if saved > lost:
                return best, (
                    f"same goodput, latency {cur.tpot_s * 1e3:.1f} -> {new.tpot_s * 1e3:.1f} ms/token: saves "
                    f"{saved:.0f} request-s over {cfg.horizon_s:.0f} s against {lost:.1f} lost to the switch"
                )
            return (
                current,
                f"{new.topology}'s latency gain ({saved:.1f} request-s) does not pay for the switch ({lost:.1f})",
            )
        return current, f"{new.topology} is not better by the thresholds"
