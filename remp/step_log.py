"""When steps finished and how many outputs each gave: the engine writes it, switch reports read it (the
throughput before and during a pre-copy, the longest gap between two steps)."""

from __future__ import annotations

import time
from collections import deque


class StepLog:
    def __init__(self, maxlen: int = 20000):
        self._log: deque[tuple[float, int]] = deque(maxlen=maxlen)  # (finished at, outputs)

    def record(self, outputs: int) -> None:
        self._log.append((time.perf_counter(), outputs))

    def last_step_time(self) -> float | None:
        return self._log[-1][0] if self._log else None

    def throughput(self, start: float, end: float | None, before_steps: int = 32) -> tuple[float | None, float | None]:
        """Output tokens/s over the last `before_steps` steps before `start`, and over the steps in [start, end]
        (None where there were none)."""
        if end is None or end <= start:
            return None, None
        before = [x for x in self._log if x[0] < start][-(before_steps + 1) :]
        during = [x for x in self._log if start <= x[0] <= end]
        span = before[-1][0] - before[0][0] if len(before) > 1 else 0.0
        rate_before = round(sum(n for _, n in before[1:]) / span, 2) if span > 0 else None
        return rate_before, round(sum(n for _, n in during) / (end - start), 2) if during else None

    def longest_gap(self, start: float, end: float, last_before: float | None) -> float:
        """Longest time without a finished step within [start, end] (the resume at `end` counts as one)."""
        times = [t for t, _ in self._log if start <= t <= end]
        times = ([last_before] if last_before is not None and last_before < start else [start]) + times + [end]
        return round(max(b - a for a, b in zip(times, times[1:])), 4)
