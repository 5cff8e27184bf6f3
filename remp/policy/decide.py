"""The topology policy: every few seconds, predict each candidate topology's goodput and latency under the
current load, and switch only when a candidate's predicted gain beats what the current topology is observed
to deliver, by a margin that grows with the switch's cost and with the model's own recent error.

Closed loop (calibrate.py): the current topology's observed TPOT and, while its queue grows, its throughput
correct the model's step times for it; every decision logs the predicted-against-observed error.

No harm by construction:
- the current topology's value is anchored in what it is observed to deliver: the better of observed and
  predicted goodput while its queue holds (a pessimistic model cannot talk it out of a topology that serves
  well), the worse of the two while its queue grows (an optimistic one cannot keep it on one that falls behind);
- a candidate's predicted goodput counts only after the model's recent error is taken off, and must beat the
  current value by a threshold plus that error plus the share of the horizon's good requests the switch hurts;
- a dwell time, `patience` confirmations, and at most `max_switches` in any `switch_window_s`;
- regret: after a switch, once the new topology has served enough requests, if it does worse than the old one
  did under a comparable load (observed SLO attainment, or the now-corrected model), switch back at once, and
  block that switch for as long as the load stays in that regime (outside it, it needs a doubled extra gain).
  Any return to the previous topology under the same load regime counts as such a round trip."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from remp.planner.mode import SwitchCost
from remp.policy.calibrate import Calibration
from remp.policy.observe import Observation
from remp.policy.perf_model import PerfModel
from remp.policy.predict import Limits, Load, Prediction, Slo, predict, step_time
from remp.topology import Shape, shape_name

STEADY_TOLERANCE = 1.25  # loads within this factor of each other over a window: a steady state
RETURN_BAR = 0.25  # the extra gain a return to the previous topology needs under the load it left


@dataclass(frozen=True)
class PolicyConfig:
    slo: Slo
    interval_s: float = 5.0  # how often to decide
    min_dwell_s: float = 60.0  # at least this long on a topology before leaving it (a regret revert aside)
    horizon_s: float = 120.0  # how long a decision is expected to pay off
    gain_threshold: float = 0.1  # goodput must rise by this fraction, beyond the model's error and the switch's cost
    latency_threshold: float = 0.2  # or, goodput equal, latency must fall by this fraction (beyond the error)
    patience: int = 2  # consecutive wins before switching
    max_switches: int = 4  # at most this many switches in any switch_window_s (regret reverts aside)
    switch_window_s: float = 900.0
    min_observed: int = 10  # requests the current topology must have served before its observations count
    regime_tolerance: float = 1.5  # loads whose rate and mean lengths are within this factor: the same regime
    max_margin: float = 1.0  # the model's error as a margin, at most this (steps twice as slow)


@dataclass
class Decision:
    time: float
    action: str  # "stay" or "switch"
    current: str
    target: str
    reason: str
    kind: str = ""  # "gain", "latency" or "revert" for a switch
    load: dict = field(default_factory=dict)
    observed: dict = field(default_factory=dict)  # what the current topology delivered, against the prediction
    calibration: dict = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """Plain JSON (an infinite latency, a topology that cannot keep up, is null)."""
        return _finite(self.__dict__.copy())


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


@dataclass
class _Switch:
    """A switch the policy made, kept to judge it (regret) and to recognise a round trip."""

    old: Shape
    new: Shape
    at: float
    load: Load
    good_before: float | None  # the old topology's observed SLO attainment
    served_before: float | None  # what it served a second, where it had a backlog all along (its capacity)
    judged: bool = False
    clear_at: float | None = None  # when the backlog the new topology inherited was served


def horizon_goodput(p: Prediction, load: Load, horizon_s: float, slo: Slo) -> float:
    """Goodput over the horizon, counting the backlog: requests already queued longer than the TTFT SLO allows
    keep newcomers waiting past it until the queue drains at capacity minus arrivals (never, if overloaded). The
    backlog left at the horizon's end beyond what the TTFT SLO lets the capacity serve is lost too, and counted
    against it: of topologies that all fall behind, the one that falls behind least is worth the most."""
    rate, cap, q = load.arrival_rate, p.capacity_req_s, load.queue
    good = min(rate, p.slo_capacity_req_s)
    if cap <= 0:
        return -(q / horizon_s + rate)
    if rate < cap:
        bad_s = max(0.0, (q - slo.ttft_s * cap) / (cap - rate))  # until waits are back under the SLO
        value = good * max(0.0, horizon_s - bad_s) / horizon_s
    else:
        ok_s = max(0.0, (slo.ttft_s * cap - q) / (rate - cap))  # until the growing wait passes the SLO
        value = good * min(ok_s, horizon_s) / horizon_s
    left = max(0.0, q + (rate - cap) * horizon_s)
    return value - max(0.0, left - slo.ttft_s * cap) / horizon_s


def latency_score(ttft_s: float, tpot_s: float, slo: Slo) -> float:
    """TTFT and TPOT as fractions of their SLOs, summed: lower is better."""
    return ttft_s / slo.ttft_s + tpot_s / slo.tpot_s


def same_regime(a: Load, b: Load, tolerance: float) -> bool:
    """Rates and mean lengths within a factor of `tolerance` of each other."""
    pairs = ((a.arrival_rate, b.arrival_rate), (a.prompt_len, b.prompt_len), (a.output_len, b.output_len))
    return all(max(x, y) <= tolerance * max(min(x, y), 1e-9) for x, y in pairs)


class TopologyPolicy:
    def __init__(
        self,
        model: PerfModel,
        candidates: list[Shape],
        limits: Limits,
        config: PolicyConfig,
        switch_cost: Callable[[Shape, Shape], SwitchCost],
        window_s: float = 30.0,
    ):
        """`window_s`: the span of the load window the caller measures over."""
        if not candidates:
            raise ValueError("the topology policy needs at least one candidate topology")
        self.model, self.limits, self.config = model, limits, config
        self.candidates = [Shape(*c) for c in candidates]
        self.switch_cost = switch_cost
        self.calibration = Calibration(model, period_s=window_s)
        self.decisions: deque[Decision] = deque(maxlen=200)
        self.counts = {"stay": 0, "switch": 0}
        self.last_switch_t = -math.inf
        self.since = -math.inf  # when the current topology began serving: its observations start here
        self.next_t = 0.0
        self._streak: tuple[str, int] = ("", 0)
        self._switch_times: deque[float] = deque()
        self._last: _Switch | None = None
        self._blocked: dict[tuple[Shape, Shape], Load] = {}  # a regretted switch, and the load it failed under
        self._bars: dict[tuple[Shape, Shape], float] = {}  # extra gain a regretted switch needs elsewhere
        self._loads: deque[tuple[float, Load]] = deque()  # the loads of recent decisions, to tell a steady state
        self.window_s = window_s
        self._steady = False

    def due(self, now: float) -> bool:
        return now >= self.next_t

    @property
    def observe_from(self) -> float:
        """Observations count the requests that arrived from here on: on the current topology, and after the
        backlog it inherited from the last switch (which delays whoever waits behind it, whatever the topology)."""
        last = self._last
        if last is not None and last.clear_at is not None and last.clear_at > self.since:
            return last.clear_at
        return self.since

    def switched(self, now: float) -> None:
        """A switch ended (by this policy or anyone else): the dwell time and the observations start again."""
        self.last_switch_t = now
        self.since = now
        self._streak = ("", 0)

    # --- one decision -------------------------------------------------------------------------------------------

    def decide(self, now: float, load: Load, current: Shape, observed: Observation | None = None) -> Decision:
        self.next_t = now + self.config.interval_s
        cfg, slo = self.config, self.config.slo
        current = Shape(*current)
        valid = observed is not None and observed.finished >= cfg.min_observed
        self._loads.append((now, load))
        while self._loads and self._loads[0][0] < now - 2 * self.window_s:
            self._loads.popleft()
        # the model is judged only in a steady state: under a load that held over the last window (and the
        # latency of the requests observed), requests that finished now ran under the load the model is given
        span = [old for t, old in self._loads if t >= now - self.window_s]
        steady = (
            now - self.since >= self.window_s
            and self._loads[0][0] <= now - self.window_s + cfg.interval_s
            and all(same_regime(old, load, STEADY_TOLERANCE) for old in span)
        )
        # ... and only without a backlog from before that window (the requests served would be another mix)
        fresh = load.queue <= load.arrival_rate * self.window_s / 2
        seen = self._calibrate(now, current, load, observed) if valid and steady and fresh else {}
        self._steady = steady and fresh
        seen["steady"] = self._steady
        # plan for the upper end of the measured rate: a topology at the edge of its capacity under the mean rate
        # overflows in the next burst (and the policy would switch back and forth)
        upper = replace(load, arrival_rate=load.arrival_rate + 2 * load.rate_stderr, rate_stderr=0.0)
        shapes = {*self.candidates, current} | ({self._last.old} if self._last else set())
        # the current topology as the corrected model sees it; the others slower by the model's recent error
        margin = min(self.calibration.error(), cfg.max_margin)
        if valid and observed.queue_min > 0 and load.queue > load.arrival_rate * slo.ttft_s:
            # a backlog all along: the current topology serves at its capacity, with the real spread of lengths
            cap = predict(self.calibration.corrected(current), current, load, self.limits, slo).capacity_req_s
            if cap > 0:
                seen |= {"capacity_observed_req_s": round(observed.throughput_req_s, 3)}
                seen |= {"capacity_predicted_req_s": round(cap * self.calibration.capacity_factor(current), 3)}
                seen |= self.calibration.update_capacity(now, current, observed.throughput_req_s, cap)
                margin = min(self.calibration.error(), cfg.max_margin)
        cal = self.calibration
        preds = {c: cal.predict(c, upper, self.limits, slo, 0.0 if c == current else margin) for c in shapes}
        good = {c: horizon_goodput(p, upper, cfg.horizon_s, slo) for c, p in preds.items()}
        value = good[current]
        if valid:
            observed_good = observed.good_fraction * upper.arrival_rate
            # a queue that grows, or one already past what the TTFT SLO lets newcomers wait behind
            growing = load.queue > 0 and (
                observed.queue_growth_req_s > 0.05 * load.arrival_rate or load.queue > load.arrival_rate * slo.ttft_s
            )
            value = min(observed_good, value) if growing else max(observed_good, value)
            seen |= {"observed_goodput_req_s": round(observed_good, 4), "queue_growing": growing}
        seen |= {"current_value_req_s": round(value, 4), "margin": round(margin, 3)}

        target, kind, reason = self._revert(now, load, current, observed if valid else None, good, value, margin)
        if target == current:
            target, kind, reason = self._weigh(
                now, upper, current, preds, good, value, margin, observed if valid else None
            )
            if target != current:
                name = shape_name(target)
                streak = self._streak[1] + 1 if self._streak[0] == name else 1
                self._streak = (name, streak)
                if streak < cfg.patience:
                    reason = f"{reason}; waiting for {cfg.patience - streak} more confirmation(s)"
                    target = current
            else:
                self._streak = ("", 0)
        d = Decision(
            time=now,
            action="switch" if target != current else "stay",
            current=str(current),
            target=str(target),
            reason=reason,
            kind=kind if target != current else "",
            load=load.__dict__.copy(),
            observed=seen,
            calibration=self.calibration.to_json(),
            predictions=[preds[c].to_json() | {"horizon_goodput_req_s": round(good[c], 4)} for c in sorted(preds)],
        )
        self.counts[d.action] += 1
        self.decisions.append(d)
        if d.action == "switch":
            self._record(now, load, current, target, kind, observed if valid else None)
            self.switched(now)
        return d

    def _calibrate(self, now: float, current: Shape, load: Load, observed: Observation) -> dict:
        """Correct the current topology's step times from what it delivered; the entry for the decision's log."""
        slo = self.config.slo
        corrected = self.calibration.predict(current, load, self.limits, slo)
        out = {"finished": observed.finished, "good_fraction": round(observed.good_fraction, 3)}
        if observed.ttft_p50_s is not None and math.isfinite(corrected.ttft_s):
            out |= {"ttft_observed_s": round(observed.ttft_p50_s, 4), "ttft_predicted_s": round(corrected.ttft_s, 4)}
        tpot = observed.tpot_p50_s
        if tpot is None or tpot <= 0 or not math.isfinite(corrected.tpot_s):
            return out
        model = self.calibration.corrected(current)
        step = step_time(model, current, load, max(observed.running_mean, 1.0), self.limits)
        # what the prediction missed by: TPOT at this load
        error = math.log(tpot / corrected.tpot_s)
        out |= {
            "tpot_observed_s": round(tpot, 4),
            "tpot_predicted_s": round(corrected.tpot_s, 4),
            "step_model_s": round(step, 4),
            "running": round(observed.running_mean, 1),
        }
        factor = self.calibration.factor(current)
        return out | self.calibration.update(now, current, factor * tpot / step, error)

    def _revert(
        self,
        now: float,
        load: Load,
        current: Shape,
        observed: Observation | None,
        good: dict,
        value: float,
        margin: float,
    ) -> tuple[Shape, str, str]:
        """Judge the last switch once the new topology has served enough: back to the old one if it did worse
        under a comparable load."""
        last, cfg = self._last, self.config
        if last is None or last.judged or last.new != current or observed is None:
            return current, "", ""
        if now - self.since < 2 * cfg.interval_s:
            return current, "", ""
        if not same_regime(last.load, load, cfg.regime_tolerance):
            last.judged = True
            return current, "", ""  # the load moved on: nothing to compare
        # SLO attainment says something once the inherited backlog is served (observe_from then counts only the
        # requests that came after it); while a backlog lasts, what counts is the rate it is served at
        short = load.queue <= load.arrival_rate * cfg.slo.ttft_s
        if short and last.clear_at is None:
            last.clear_at = now
            return current, "", ""
        cleared = last.clear_at is not None and observed.since >= last.clear_at
        busy = observed.queue_min > 0 and not short
        worse_observed, by_attainment = False, cleared and last.good_before is not None
        if by_attainment:
            worse_observed = observed.good_fraction < last.good_before - 0.1
        elif busy and last.served_before is not None:
            worse_observed = observed.throughput_req_s < last.served_before * (1 - cfg.gain_threshold)
        worse_model = good[last.old] > value + abs(value) * cfg.gain_threshold
        if cleared or (busy and last.served_before is not None) or worse_model:
            last.judged = True
        if not (worse_observed or worse_model):
            return current, "", ""
        if worse_observed and by_attainment:
            why = f"SLO attainment {observed.good_fraction:.0%} against {last.good_before:.0%} on {last.old}"
        elif worse_observed:
            why = f"it serves {observed.throughput_req_s:.2f} req/s against {last.served_before:.2f} on {last.old}"
        else:
            why = f"the corrected model now gives {last.old} {good[last.old]:.2f} req/s against {value:.2f}"
        return last.old, "revert", f"regret: {current} does worse than {last.old} did under this load ({why})"

    def _weigh(
        self,
        now: float,
        load: Load,
        current: Shape,
        preds: dict[Shape, Prediction],
        good: dict[Shape, float],
        value: float,
        margin: float,
        observed: Observation | None,
    ) -> tuple[Shape, str, str]:
        cfg, slo = self.config, self.config.slo
        cur = preds[current]
        others = [c for c in self.candidates if c != current]
        if not others:
            return current, "", f"{current} is the only candidate"
        best = max(others, key=lambda c: (round(good[c], 3), -latency_score(preds[c].ttft_s, preds[c].tpot_s, slo)))
        new = preds[best]
        if now - self.last_switch_t < cfg.min_dwell_s:
            left = cfg.min_dwell_s - (now - self.last_switch_t)
            return current, "", f"{best} might be better but the dwell time has {left:.0f} s left"
        blocked = self._blocked.get((current, best))
        if blocked is not None and same_regime(blocked, load, cfg.regime_tolerance):
            return current, "", f"{current} -> {best} was regretted under this load regime"
        recent = [t for t in self._switch_times if now - t < cfg.switch_window_s]
        if len(recent) >= cfg.max_switches:
            return current, "", f"{len(recent)} switches in the last {cfg.switch_window_s:.0f} s: at the cap"
        cost = self.switch_cost(current, best)
        # requests the switch hurts: in flight or arriving while it pauses, as far as the pause eats their TTFT
        # budget, and those arriving while a pre-copy slows serving
        share = min(1.0, cost.pause_s / slo.ttft_s)
        hurt = (load.running + load.arrival_rate * cost.pause_s) * share
        hurt += load.arrival_rate * cost.precopy_s * cost.slowdown
        # the bar: a fraction of the current value (the threshold, the model's error, any regret), plus the
        # requests the switch hurts spread over the horizon
        extra = cfg.gain_threshold + self._bars.get((current, best), 0.0)
        last = self._last
        if (
            last is not None
            and (last.new, last.old) == (current, best)
            and same_regime(last.load, load, cfg.regime_tolerance)
        ):
            extra += RETURN_BAR  # back where it came from under the same load: a round trip, so the bar is higher
        need = abs(value) * extra + hurt / cfg.horizon_s
        if good[best] - value > need:
            return (
                best,
                "gain",
                (
                    f"goodput {value:.2f} -> {good[best]:.2f} req/s (its steps {margin:.0%} slower than the corrected "
                    f"model's: its recent error) clears the bar of +{need:.2f} req/s ({extra:.0%} and ~{hurt:.1f} "
                    f"requests hurt by a {cost.pause_s * 1e3:.0f} ms pause over {cfg.horizon_s:.0f} s)"
                ),
            )
        if good[best] > value + abs(value) * cfg.gain_threshold:
            return (
                current,
                "",
                f"{best}'s goodput gain does not clear the bar of +{need:.2f} req/s (error, cost, regret)",
            )
        return self._latency(load, current, best, cur, new, observed, margin, cost, hurt)

    def _latency(
        self,
        load: Load,
        current: Shape,
        best: Shape,
        cur: Prediction,
        new: Prediction,
        observed: Observation | None,
        margin: float,
        cost: SwitchCost,
        hurt: float,
    ) -> tuple[Shape, str, str]:
        """Goodput equal: a lower latency, against the latency the current topology is observed to give, if
        the candidate keeps headroom under the SLOs and its capacity, and the time saved exceeds the time lost."""
        cfg, slo = self.config, self.config.slo
        ttft = observed.ttft_p50_s if observed and observed.ttft_p50_s is not None else cur.ttft_s
        tpot = observed.tpot_p50_s if observed and observed.tpot_p50_s is not None else cur.tpot_s
        if not self._steady:
            return current, "", f"{best} is not better in goodput; latency waits for a steady load"
        old_s = latency_score(ttft, tpot, slo)
        new_s = latency_score(new.ttft_s, new.tpot_s, slo)
        roomy = (
            new.capacity_req_s >= load.arrival_rate * (1 + cfg.gain_threshold)
            and new.ttft_s <= slo.ttft_s
            and new.tpot_s <= slo.tpot_s
        )
        bar = cfg.latency_threshold + self._bars.get((current, best), 0.0)
        if not (math.isfinite(old_s) and roomy and new_s < old_s * (1 - bar)):
            return current, "", f"{best} is not better by the thresholds (its steps {margin:.0%} slower)"
        per_request = load.output_len * (tpot - new.tpot_s) + (ttft - new.ttft_s)
        saved = load.arrival_rate * cfg.horizon_s * per_request
        lost = hurt * cost.pause_s + load.running * cost.precopy_s * cost.slowdown * tpot
        if saved > lost:
            return (
                best,
                "latency",
                (
                    f"same goodput, latency {tpot * 1e3:.1f} -> {new.tpot_s * 1e3:.1f} ms/token, TTFT {ttft * 1e3:.0f} -> "
                    f"{new.ttft_s * 1e3:.0f} ms: saves {saved:.0f} request-s over {cfg.horizon_s:.0f} s against "
                    f"{lost:.1f} lost to the switch"
                ),
            )
        return current, "", f"{best}'s latency gain ({saved:.1f} request-s) does not pay for the switch ({lost:.1f})"

    def _record(
        self, now: float, load: Load, current: Shape, target: Shape, kind: str, observed: Observation | None
    ) -> None:
        """Remember the switch: to judge it later, to cap the rate of switches, to recognise a round trip."""
        last = self._last
        back = last is not None and last.new == current and last.old == target
        if back and same_regime(last.load, load, self.config.regime_tolerance):
            # a round trip under one load regime: the way out is blocked while the regime lasts, and needs a
            # doubled extra gain in any other
            pair = (last.old, last.new)
            self._blocked[pair] = last.load
            self._bars[pair] = max(0.2, 2 * self._bars.get(pair, 0.0))
        if kind != "revert":
            self._switch_times.append(now)
        # its SLO attainment counts the requests that finished; with a backlog, those still waiting are missing
        # from it (and are the ones missing the SLO): then only the rate it served at says what it was worth
        backlog = load.queue > load.arrival_rate * self.config.slo.ttft_s
        good = observed.good_fraction if observed is not None and not backlog else None
        served = observed.throughput_req_s if observed is not None and observed.queue_min > 0 else None
        # a revert, or any return to where it came from, is not judged again: that would be the loop itself
        self._last = _Switch(current, target, now, load, good, served, judged=kind == "revert" or back)
