"""Serving metrics from per-request timings: pure functions with vLLM's definitions, so numbers compare directly.

TTFT = first non-empty chunk - send; ITL = gaps between non-empty chunks; E2EL = last byte - send;
TPOT = (E2EL - TTFT) / (output_tokens - 1), defined only for requests with more than one output token.
Times are stored in seconds and reported in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    """What one request did. Times in seconds; `send_time` is from the start of the run. With retries, TTFT and
    latency count from the first attempt (what a client waiting on it saw)."""

    index: int
    phase: int = 0
    success: bool = False
    error: str = ""
    send_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    retries: int = 0
    attempt_errors: list[str] = field(default_factory=list)

    def chunk_times(self) -> np.ndarray:
        """Arrival time (from run start) of each non-empty chunk."""
        if not self.success or self.output_tokens == 0:
            return np.zeros(0)
        return self.send_time + self.ttft + np.concatenate(([0.0], np.cumsum(self.itl)))


def tpot(r: RequestResult) -> float | None:
    """Time per output token after the first; None with fewer than 2 output tokens."""
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            key, sep, val = part.partition(":")
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"--goodput takes KEY:MS with KEY in {SLO_KEYS}, got {part!r}")
            if float(val) < 0:
                raise ValueError(f"--goodput {key} must be >= 0 ms")
            slos[key] = float(val)
    return slos


def meets_slos(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    """vLLM's goodput rule: successful and within every given SLO (a 1-token request has TPOT 0 here)."""
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": tpot(r) or 0.0, "e2el": r.latency}
    return all(values[k] * 1000 <= v for k, v in slos_ms.items())


def distribution(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    """mean/median/std/p<P> of `values_s` in ms under vLLM's key names (e.g. p99_ttft_ms); zeros when empty."""
    a = np.asarray(values_s, dtype=float) * 1000
    out = {
        f"mean_{name}_ms": float(a.mean()) if a.size else 0.0,
        f"median_{name}_ms": float(np.median(a)) if a.size else 0.0,
        f"std_{name}_ms": float(a.std()) if a.size else 0.0,
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(a, p)) if a.size else 0.0
    return out


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    percentiles: tuple[float, ...] = (90, 99),
    slos_ms: dict[str, float] | None = None,
) -> dict:
    """Totals, throughputs and latency distributions over `results`, run over `duration_s` seconds."""
    ok = [r for r in results if r.success]
    dur = max(duration_s, 1e-9)
    tin, tout = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    m: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "retried_requests": sum(r.retries > 0 for r in results),
        "total_retries": sum(r.retries for r in results),
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": len(ok) / dur,
        "output_throughput": tout / dur,
        "total_token_throughput": (tin + tout) / dur,
    }
    if slos_ms:
        good = sum(meets_slos(r, slos_ms) for r in ok)
        m.update(goodput_slos_ms=dict(slos_ms), good_requests=good, request_goodput=good / dur)
    m |= distribution("ttft", [r.ttft for r in ok], percentiles)
    m |= distribution("tpot", [t for r in ok if (t := tpot(r)) is not None], percentiles)
    m |= distribution("itl", [x for r in ok for x in r.itl], percentiles)
    m |= distribution("e2el", [r.latency for r in ok], percentiles)
    return m


def phase_metrics(
    results: list[RequestResult],
    num_phases: int,
    percentiles: tuple[float, ...] = (90, 99),
    slos_ms: dict[str, float] | None = None,
) -> list[dict]:
    """compute_metrics per phase; a phase's duration runs from its first send to its last request's end."""
    out = []
    for k in range(num_phases):
        rs = [r for r in results if r.phase == k]
        start = min((r.send_time for r in rs), default=0.0)
        end = max((r.send_time + r.latency for r in rs), default=0.0)
        out.append(
            {"num_requests": len(rs), "first_send_s": start, "last_end_s": end}
            | compute_metrics(rs, end - start, percentiles, slos_ms)
        )
    return out


def format_summary(
    m: dict,
    title: str = "Serving Benchmark Result",
    percentiles: tuple[float, ...] = (90, 99),
    max_concurrency: int | None = None,
) -> str:
    """vLLM's summary block."""
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}"]

    def row(label: str, value, fmt: str = "<10.2f") -> None:
        lines.append(f"{label:<40}{value:{fmt}}")

    row("Successful requests:", m["completed"], "<10")
    row("Failed requests:", m["failed"], "<10")
    if m.get("total_retries"):
        row("Retried requests:", m["retried_requests"], "<10")
        row("Total retries:", m["total_retries"], "<10")
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency, "<10")
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"], "<10")
    row("Total generated tokens:", m["total_output_tokens"], "<10")
    row("Request throughput (req/s):", m["request_throughput"])
    if "request_goodput" in m:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total Token throughput (tok/s):", m["total_token_throughput"])
    for key, head, label in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("e2el", "End-to-end Latency", "E2EL"),
    ):
        lines.append(f"{head:-^{w}}")
        row(f"Mean {label} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {label} (ms):", m[f"median_{key}_ms"])
        for p in percentiles:
            row(f"P{p:g} {label} (ms):", m[f"p{p:g}_{key}_ms"])
    lines.append("=" * w)
    return "\n".join(lines)
