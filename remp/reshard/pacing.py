"""How fast a live switch's pre-copy goes (pure logic: live.py runs it, the worker's main thread feeds StepClock).

The pre-copy shares the cores with serving: every second it keeps a core busy is taken from the steps. It works
in short bursts and rests between them; after each burst `Pacer.rest` says for how long, from two aims:
- serving keeps its speed: the steps this worker runs during the pre-copy take at most `max_slowdown` times as
  long as before it (1 / 0.7: serving keeps 70% of its throughput). The duty (busy / (busy + rest)) starts at
  the engine's `switch_precopy_duty` share, shrinks while the steps are slower than that, grows back (up to the
  share) while they are not, and is 1 while this worker runs no step at all: there is nothing to slow down then;
- the pre-copy ends within its deadline (`switch_max_precopy_s`): from the work done so far (units: bytes moved,
  assembled or built) and the busy time it took, the rest of the work needs some duty to end in time; when that
  is more than serving allows, the deadline wins, and `late` records that serving slowed down more.
A share of 1 is no pacing at all: the pre-copy never rests.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SLOWDOWN = 1 / 0.7  # serving keeps 70% of its speed
RECENT_STEPS = 8  # the steps a slowdown is measured over


class StepClock:
    """When this worker's steps ran: written by its main thread, read by the pre-copy thread (deque appends and
    copies are atomic under the GIL)."""

    def __init__(self, keep: int = 64, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self.steps: deque[tuple[float, float]] = deque(maxlen=keep)  # (ended at, duration)
        self.count = 0  # steps ever ended
        self.running_since: float | None = None

    def __enter__(self) -> StepClock:
        self.running_since = self.now()
        return self

    def __exit__(self, *exc) -> None:
        end = self.now()
        self.steps.append((end, end - self.running_since))
        self.count += 1
        self.running_since = None

    def idle_for(self) -> float:
        """Seconds since the last step ended (0 while one runs; forever if none ran)."""
        if self.running_since is not None:
            return 0.0
        return self.now() - self.steps[-1][0] if self.steps else float("inf")


@dataclass
class Pacer:
    share: float  # the duty allowed while serving (the engine's switch_precopy_duty, per worker)
    clock: StepClock | None = None  # None: no steps to watch (a worker that only joins)
    max_slowdown: float = MAX_SLOWDOWN
    now: Callable[[], float] = time.perf_counter
    duty: float = field(init=False)
    late: bool = field(default=False, init=False)  # the deadline needed more than serving allowed
    lowest_duty: float = field(init=False)
    slowdown: float | None = field(default=None, init=False)  # the last measured (steps during / before)

    def __post_init__(self) -> None:
        self.duty = self.lowest_duty = self.share
        self.baseline = self._median([d for _, d in self.clock.steps]) if self.clock else None
        self.since = self.now()  # steps that ended after this are "during"
        self.adjusted_at = self.clock.count if self.clock else 0  # steps ended at the last adjustment
        self.new_round(float("inf"), 0)

    def new_round(self, deadline_s: float, units: float) -> None:
        """A round of work (weights, then KV blocks): `units` of it, to end within `deadline_s` from now."""
        self.deadline = self.now() + deadline_s
        self.units, self.done, self.busy = max(units, 1e-9), 0.0, 0.0

    def rest(self, busy_s: float, units: float) -> float:
        """A burst of `busy_s` seconds did `units` of the round: how long to rest before the next one."""
        self.busy += busy_s
        self.done += units
        if self.share >= 1:
            return 0.0  # unthrottled
        duty = self._serving_duty()
        need = self._needed_duty()
        if need > duty:
            self.late = self.late or need > self.share
            duty = need
        self.lowest_duty = min(self.lowest_duty, duty)
        return 0.0 if duty >= 1 else busy_s * (1 / duty - 1)

    def _needed_duty(self) -> float:
        """The duty the rest of the round needs to end by the deadline, at the busy time per unit so far."""
        left = self.deadline - self.now()
        if self.done <= 0:
            return 0.0
        if left <= 0:
            return 1.0
        return min(1.0, self.busy / self.done * max(0.0, self.units - self.done) / left)

    def _serving_duty(self) -> float:
        clock = self.clock
        if clock is None:
            return self.duty
        idle_after = max(0.05, 4 * (self.baseline or 0.0))
        if clock.steps and clock.idle_for() > idle_after:
            return 1.0  # nothing is being served: nothing to slow down (a worker that never served cannot tell)
        if self.baseline and clock.count >= self.adjusted_at + 2:  # two new steps since the last look
            self.adjusted_at = clock.count
            during = [d for end, d in clock.steps if end > self.since]
            self.slowdown = self._median(during[-RECENT_STEPS:]) / self.baseline
            if self.slowdown > self.max_slowdown:
                self.duty = max(self.share / 8, self.duty * 0.7)
            elif self.slowdown < 0.85 * self.max_slowdown:
                self.duty = min(self.share, self.duty * 1.2)
        return self.duty

    @staticmethod
    def _median(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def summary(self) -> dict[str, float]:
        return {
            "share": round(self.share, 4),
            "lowest_duty": round(self.lowest_duty, 4),
            "late": float(self.late),
            "slowdown": round(self.slowdown, 3) if self.slowdown is not None else -1.0,
        }
