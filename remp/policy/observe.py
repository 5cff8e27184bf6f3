"""The load as the policy sees it: arrivals, lengths and latencies over a sliding window of time."""

from __future__ import annotations

from collections import deque

import numpy as np

from remp.policy.predict import Load


class LoadWindow:
    """Events of the last `window_s` seconds. Times are the caller's clock (wall time live, simulated time in
    the simulator), so the same code serves both."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, max tokens)
        self._finished: deque[tuple[float, int]] = deque()  # (time, output tokens)
        self._ttft: deque[tuple[float, float]] = deque()
        self._tpot: deque[tuple[float, float]] = deque()
        self._first: float | None = None

    def arrival(self, t: float, prompt_tokens: int, max_tokens: int) -> None:
        self._first = t if self._first is None else self._first
        self._arrivals.append((t, prompt_tokens, max_tokens))

    def finished(self, t: float, output_tokens: int, ttft_s: float | None, tpot_s: float | None) -> None:
        self._finished.append((t, output_tokens))
        if ttft_s is not None:
            self._ttft.append((t, ttft_s))
        if tpot_s is not None:
            self._tpot.append((t, tpot_s))

    def _trim(self, now: float) -> None:
        for q in (self._arrivals, self._finished, self._ttft, self._tpot):
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def snapshot(self, now: float, queue: int = 0, running: int = 0) -> Load | None:
        """The load of the window ending at `now`; None before anything arrived."""
        self._trim(now)
        if self._first is None:
            return None
        span = max(min(self.window_s, now - self._first), 1e-3)
        prompts = [p for _, p, _ in self._arrivals]
        # output lengths: what finished requests produced (max_tokens overstates it when they stop early)
        outputs = [o for _, o in self._finished] or [m for *_, m in self._arrivals]
        return Load(
            arrival_rate=len(self._arrivals) / span,
            rate_stderr=max(len(self._arrivals), 1) ** 0.5 / span,
            prompt_len=float(np.mean(prompts)) if prompts else 1.0,
            output_len=float(np.mean(outputs)) if outputs else 1.0,
            queue=queue,
            running=running,
        )

    def latency(self) -> dict[str, float | None]:
        """Observed median TTFT and TPOT of the window, to set against the SLOs."""
        med = lambda q: float(np.median([v for _, v in q])) if q else None
        return {"ttft_p50_s": med(self._ttft), "tpot_p50_s": med(self._tpot)}
