"""The closed loop: what the current topology delivers corrects the performance model. Each topology has a
correction factor on its step times, refreshed from its observed steps: the observed TPOT against the model's
iteration time for the batch the scheduler really ran (the requests running, the prompts arriving); and one on
its capacity, from what it serves while it has a backlog. A topology not yet seen takes the mean of the factors
seen so far (the model's shared bias). What the whole prediction
(step times and the queueing model) missed by, with the correction in force, over the last few observations,
is the model's recent error: the policy's margin against its own predictions."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from remp.policy.perf_model import Batch, PerfModel
from remp.policy.predict import Limits, Load, Prediction, Slo, predict
from remp.topology import Shape

FACTOR_STEP = 0.05  # factors are applied in 5% steps, so predictions for a corrected model are cached and reused
PRIOR_ERROR = 0.1  # the margin before anything was observed


@dataclass(frozen=True)
class Scaled:
    """A PerfModel whose stage and hand-off times are `factor` times the base model's."""

    base: PerfModel
    factor: float

    @property
    def name(self) -> str:
        return f"{self.base.name} x{self.factor:.2f}"

    def stage_s(self, tp: int, pp: int, batch: Batch) -> float:
        return self.base.stage_s(tp, pp, batch) * self.factor

    def hop_s(self, tp: int, pp: int, batch: Batch) -> float:
        return self.base.hop_s(tp, pp, batch) * self.factor

    def busy_factor(self, tp: int, pp: int, active: int) -> float:
        return self.base.busy_factor(tp, pp, active)

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        return self.base.kv_capacity_tokens(tp, pp)


class Calibration:
    """Per-topology corrections, each moved by `gain` of the (log) error at each observation: of the step times
    (from the observed TPOT) and of the capacity (from what a topology with a backlog serves: its capacity, with
    the real spread of lengths that the model, which knows only their means, misses). A topology not yet seen
    takes the mean of those seen."""

    def __init__(
        self, model: PerfModel, gain: float = 0.5, memory: int = 6, max_factor: float = 8.0, period_s: float = 30.0
    ):
        """The error is the mean of the largest misses of the last `memory` periods of `period_s`."""
        self.model, self.gain, self.max_log, self.period_s = model, gain, math.log(max_factor), period_s
        self._log: dict[Shape, float] = {}
        self._cap: dict[Shape, float] = {}
        self._errors: deque[tuple[float, float]] = deque(maxlen=memory)  # (period start, largest miss)

    @staticmethod
    def _mean(logs: dict[Shape, float], shape: Shape) -> float:
        if shape in logs:
            return logs[shape]
        return sum(logs.values()) / len(logs) if logs else 0.0

    def factor(self, shape: Shape) -> float:
        return math.exp(self._mean(self._log, Shape(*shape)))

    def capacity_factor(self, shape: Shape) -> float:
        return math.exp(self._mean(self._cap, Shape(*shape)))

    def corrected(self, shape: Shape, margin: float = 0.0) -> PerfModel:
        """The model with `shape`'s correction, its step times `margin` longer still (a pessimistic view)."""
        f = self.factor(shape) * (1 + margin)
        if abs(f - 1.0) < FACTOR_STEP / 2:
            return self.model
        return Scaled(self.model, round(math.exp(round(math.log(f) / FACTOR_STEP) * FACTOR_STEP), 4))

    def predict(self, shape: Shape, load: Load, limits: Limits, slo: Slo, margin: float = 0.0) -> Prediction:
        """`predict` with `shape`'s corrections (and `margin`, see corrected)."""
        p = predict(self.corrected(shape, margin), shape, load, limits, slo)
        c = self.capacity_factor(shape)
        if abs(c - 1.0) < 1e-9:
            return p
        cap, slo_cap = p.capacity_req_s * c, p.slo_capacity_req_s * c
        ttft = p.ttft_s if load.arrival_rate <= cap else math.inf
        return replace(
            p,
            capacity_req_s=cap,
            slo_capacity_req_s=slo_cap,
            ttft_s=ttft,
            goodput_req_s=min(load.arrival_rate, slo_cap),
        )

    def error(self) -> float:
        """The model's recent relative error (mean absolute log error, as a fraction)."""
        if not self._errors:
            return PRIOR_ERROR
        return math.expm1(sum(e for _, e in self._errors) / len(self._errors))

    def _miss(self, now: float, error: float) -> None:
        error = min(abs(error), self.max_log)
        if self._errors and now - self._errors[-1][0] < self.period_s:
            self._errors[-1] = (self._errors[-1][0], max(self._errors[-1][1], error))
        else:
            self._errors.append((now, error))

    def _move(self, logs: dict[Shape, float], shape: Shape, target: float) -> tuple[float, float]:
        before = self._mean(logs, shape)
        want = max(-self.max_log, min(self.max_log, math.log(max(target, 1e-6))))
        logs[shape] = before + self.gain * (want - before)
        return before, want

    def update(self, now: float, shape: Shape, target: float, error: float) -> dict:
        """The current topology's step times are `target` times the base model's, by the latest observation, and
        the prediction (with the correction before it) missed what was observed by `error` (a log ratio)."""
        s = Shape(*shape)
        before, want = self._move(self._log, s, target)
        self._miss(now, error)
        return {
            "topology": str(s),
            "observed_factor": round(math.exp(want), 3),
            "factor_before": round(math.exp(before), 3),
            "factor": round(self.factor(s), 3),
            "model_error": round(self.error(), 3),
        }

    def update_capacity(self, now: float, shape: Shape, served: float, predicted: float) -> dict:
        """The current topology, with a backlog, serves `served` requests a second where the model (step times
        corrected, capacity not) predicts `predicted`."""
        s = Shape(*shape)
        before, want = self._move(self._cap, s, served / predicted)
        self._miss(now, want - before)
        return {
            "capacity_factor_before": round(math.exp(before), 3),
            "capacity_factor": round(self.capacity_factor(s), 3),
            "model_error": round(self.error(), 3),
        }

    def to_json(self) -> dict:
        return {
            "factors": {str(s): round(math.exp(v), 3) for s, v in self._log.items()},
            "capacity_factors": {str(s): round(math.exp(v), 3) for s, v in self._cap.items()},
            "error": round(self.error(), 4),
        }
