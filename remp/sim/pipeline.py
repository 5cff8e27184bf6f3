"""The simulated pipeline: pp stages in order, each working on one micro-batch at a time, first come first
served, with a hand-off between stages. Where stages share cores (several worker processes on a few CPU
cores) a stage is slower while others work too: `factor(active)` scales every working stage's time by how
many stages work at once (processor sharing); on dedicated devices it is 1 and this is the plain recurrence
"a stage starts when the micro-batch has left the previous stage and the stage is free"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_EPS = 1e-12


@dataclass
class _MicroBatch:
    payload: object
    work: float  # seconds on one stage at factor 1
    hop: float  # seconds from one stage to the next
    stage: int = 0
    ready_at: float = 0.0  # in transit to `stage` until then
    left: float = -1.0  # work left on `stage` while it runs there; -1 before it starts


class Pipeline:
    def __init__(self, pp: int, factor: Callable[[int], float] = lambda active: 1.0, now: float = 0.0):
        self.pp, self.factor, self.now = pp, factor, now
        self._items: list[_MicroBatch] = []  # in submission order, which no micro-batch overtakes

    def __len__(self) -> int:
        return len(self._items)

    def payloads(self) -> list:
        return [m.payload for m in self._items]

    def submit(self, payload: object, stage_s: float, hop_s: float, start_at: float) -> None:
        """Enter stage 0 at `start_at` (>= now), taking `stage_s` per stage and `hop_s` per hand-off."""
        self._items.append(_MicroBatch(payload, stage_s, hop_s, ready_at=max(start_at, self.now)))
        self._dispatch()

    def _running(self) -> list[_MicroBatch]:
        return [m for m in self._items if m.left >= 0]

    def next_event(self) -> float | None:
        """When the next micro-batch starts or leaves a stage, given no submission before then."""
        running = self._running()
        f = self.factor(len(running)) if running else 1.0
        times = [self.now + m.left * f for m in running]
        times += [m.ready_at for m in self._items if m.left < 0 and m.ready_at > self.now]
        return min(times, default=None)

    def advance(self, t: float) -> list:
        """Move the clock to `t`; the payloads of the micro-batches that left the last stage by then, in order."""
        done = []
        while True:
            nxt = self.next_event()
            step_to = t if nxt is None or nxt > t else nxt
            running = self._running()
            if running:
                rate = 1.0 / self.factor(len(running))
                for m in running:
                    m.left = max(m.left - (step_to - self.now) * rate, 0.0)
            self.now = step_to
            for m in running:
                if m.left <= _EPS:
                    if m.stage == self.pp - 1:
                        self._items.remove(m)
                        done.append(m.payload)
                    else:
                        m.stage, m.ready_at, m.left = m.stage + 1, self.now + m.hop, -1.0
            self._dispatch()
            if step_to >= t:
                return done

    def _dispatch(self) -> None:
        """Start, on every free stage, the earliest micro-batch that has arrived there."""
        busy = {m.stage for m in self._items if m.left >= 0}
        for m in self._items:
            if m.left < 0 and m.stage not in busy and m.ready_at <= self.now:
                m.left = m.work
                busy.add(m.stage)
