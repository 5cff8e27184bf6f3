"""The closed loop: what the current topology delivers corrects the performance model. Each topology has a
correction factor on its step times, refreshed from its observed steps: the observed TPOT against the model's
iteration time for the batch the scheduler really ran (the requests running, the prompts arriving); a topology
not yet seen takes the mean of the factors seen so far (the model's shared bias). What the whole prediction
(step times and the queueing model) missed by, with the correction in force, over the last few observations,
is the model's recent error: the policy's margin against its own predictions."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from remp.policy.perf_model import Batch, PerfModel
from remp.topology import Shape

FACTOR_STEP = 0.02  # factors are kept in 2% steps, so predictions for a corrected model are cached and reused
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
    """Per-topology correction factors, moved by `gain` of the (log) error at each observation."""

    def __init__(self, model: PerfModel, gain: float = 0.5, memory: int = 6, max_factor: float = 8.0):
        self.model, self.gain, self.max_log = model, gain, math.log(max_factor)
        self._log: dict[Shape, float] = {}
        self._errors: deque[float] = deque(maxlen=memory)

    def factor(self, shape: Shape) -> float:
        s = Shape(*shape)
        if s in self._log:
            return math.exp(self._log[s])
        return math.exp(sum(self._log.values()) / len(self._log)) if self._log else 1.0

    def corrected(self, shape: Shape, margin: float = 0.0) -> PerfModel:
        """The model with `shape`'s correction, its step times `margin` longer still (a pessimistic view)."""
        f = self.factor(shape) * (1 + margin)
        if abs(f - 1.0) < FACTOR_STEP / 2:
            return self.model
        return Scaled(self.model, round(math.exp(round(math.log(f) / FACTOR_STEP) * FACTOR_STEP), 4))

    def error(self) -> float:
        """The model's recent relative error (mean absolute log error, as a fraction)."""
        if not self._errors:
            return PRIOR_ERROR
        return math.expm1(sum(self._errors) / len(self._errors))

    def update(self, shape: Shape, target: float, error: float) -> dict:
        """The current topology's step times are `target` times the base model's, by the latest observation, and
        the prediction (with the correction before it) missed what was observed by `error` (a log ratio)."""
        s = Shape(*shape)
        before = math.log(self.factor(s))
        want = max(-self.max_log, min(self.max_log, math.log(max(target, 1e-6))))
        self._errors.append(min(abs(error), self.max_log))
        self._log[s] = before + self.gain * (want - before)
        return {
            "topology": str(s),
            "observed_factor": round(math.exp(want), 3),
            "factor_before": round(math.exp(before), 3),
            "factor": round(self.factor(s), 3),
            "model_error": round(self.error(), 3),
        }

    def to_json(self) -> dict:
        return {"factors": {str(s): round(math.exp(v), 3) for s, v in self._log.items()}, "error": self.error()}
