"""The load as the policy sees it: arrivals, lengths and latencies over a sliding window of time, and what the
current topology delivered (the closed loop's observations)."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from remp.policy.predict import Load, Slo


@dataclass(frozen=True)
class Observation:
    """What the requests that arrived since `since` (the current topology's start) and finished in the window
    saw, and how the queue moved meanwhile."""

    since: float
    finished: int
    ttft_p50_s: float | None
    tpot_p50_s: float | None
    good_fraction: float  # met both SLOs
    throughput_req_s: float  # finished per second since `since` (within the window)
    queue_growth_req_s: float  # waiting requests gained per second (a queue that grows: over capacity)
    running_mean: float = 0.0  # requests running, on average over the snapshots since `since`
    queue_min: int = 0  # the fewest waiting at any snapshot since `since` (> 0: busy all along)

    def to_json(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class LoadWindow:
    """Events of the last `window_s` seconds. Times are the caller's clock (wall time live, simulated time in
    the simulator), so the same code serves both."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, max tokens)
        # (time, output tokens, arrival time, TTFT, TPOT, max_tokens or 0)
        self._finished: deque[tuple[float, int, float, float | None, float | None, int]] = deque()
        self._queue: deque[tuple[float, int, int]] = deque()  # (time, waiting, running) at each snapshot
        self._first: float | None = None

    def arrival(self, t: float, prompt_tokens: int, max_tokens: int) -> None:
        self._first = t if self._first is None else self._first
        self._arrivals.append((t, prompt_tokens, max_tokens))

    def finished(
        self,
        t: float,
        output_tokens: int,
        ttft_s: float | None,
        tpot_s: float | None,
        arrived: float | None = None,
        max_tokens: int = 0,
    ) -> None:
        """A request finished at `t`; `arrived` defaults to what its latencies say (t - TTFT - TPOT (n - 1));
        `max_tokens`, what it asked for (to learn how much of it requests use)."""
        if arrived is None:
            arrived = t - (ttft_s or 0.0) - (tpot_s or 0.0) * max(output_tokens - 1, 0)
        self._finished.append((t, output_tokens, arrived, ttft_s, tpot_s, max_tokens))

    def _trim(self, now: float) -> None:
        for q in (self._arrivals, self._finished, self._queue):
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def snapshot(self, now: float, queue: int = 0, running: int = 0) -> Load | None:
        """The load of the window ending at `now`; None before anything arrived."""
        self._trim(now)
        self._queue.append((now, queue, running))
        if self._first is None:
            return None
        span = max(min(self.window_s, now - self._first), 1e-3)
        prompts = [p for _, p, _ in self._arrivals]
        # output lengths: what the arrivals ask for, times the share of it that finished requests used
        # (max_tokens overstates it when they stop early); what finished requests produced where they did not say
        asked = [m for *_, m in self._arrivals]
        told = [(f[1], f[5]) for f in self._finished if f[5] > 0]
        if told and asked:
            used = sum(o for o, _ in told) / sum(m for _, m in told)
            outputs = [m * used for m in asked]
        else:
            outputs = [f[1] for f in self._finished] or asked
        return Load(
            arrival_rate=len(self._arrivals) / span,
            rate_stderr=max(len(self._arrivals), 1) ** 0.5 / span,
            prompt_len=float(np.mean(prompts)) if prompts else 1.0,
            output_len=float(np.mean(outputs)) if outputs else 1.0,
            queue=queue,
            running=running,
        )

    def observe(self, now: float, since: float, slo: Slo) -> Observation:
        """What the current topology (serving since `since`) delivered to the requests that arrived on it."""
        self._trim(now)
        mine = [f for f in self._finished if f[2] >= since]
        ttfts = [f[3] for f in mine if f[3] is not None]
        tpots = [f[4] for f in mine if f[4] is not None]
        good = sum(1 for f in mine if (f[3] or 0.0) <= slo.ttft_s and (f[4] or 0.0) <= slo.tpot_s)
        span = max(now - max(since, now - self.window_s), 1e-3)
        q = [s for s in self._queue if s[0] >= since]
        growth = (q[-1][1] - q[0][1]) / (q[-1][0] - q[0][0]) if len(q) > 1 and q[-1][0] > q[0][0] else 0.0
        return Observation(
            since=since,
            finished=len(mine),
            ttft_p50_s=float(np.median(ttfts)) if ttfts else None,
            tpot_p50_s=float(np.median(tpots)) if tpots else None,
            good_fraction=good / len(mine) if mine else 1.0,
            throughput_req_s=sum(1 for f in self._finished if f[0] >= since) / span,
            queue_growth_req_s=growth,
            running_mean=float(np.mean([s[2] for s in q])) if q else 0.0,
            queue_min=min((s[1] for s in q), default=0),
        )

    def latency(self) -> dict[str, float | None]:
        """Observed median TTFT and TPOT of the window, to set against the SLOs."""
        med = lambda i: float(np.median(v)) if (v := [f[i] for f in self._finished if f[i] is not None]) else None
        return {"ttft_p50_s": med(3), "tpot_p50_s": med(4)}
