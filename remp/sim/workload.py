"""Workloads for the simulator: a production trace (arrivals and lengths; also replayed backwards), or phases of
Poisson / Gamma arrivals with their own lengths, as `remp bench serve --phases` describes them, among them a
bursty Gamma process whose prompt lengths drift. Lengths only: no prompts."""

from __future__ import annotations

import math

import numpy as np

from remp.bench.datasets import (
    DatasetOptions,
    PhaseWindow,
    SampleRequest,
    fit_context,
    parse_phases,
    plan,
    trace_requests,
)

__all__ = ["drifting_gamma_phases", "phased_requests", "reversed_requests", "trace_requests"]


def phased_requests(
    spec: str | list, seed: int, input_len: int = 1024, output_len: int = 128, max_model_len: int | None = None
) -> tuple[list[SampleRequest], list[PhaseWindow]]:
    """Phases (JSON as for `remp bench serve --phases`: request_rate, burstiness, duration_s or num_prompts,
    input_len, output_len, range_ratio, name) on one clock, with the arrivals `remp bench serve` sends for the
    same seed; lengths uniform in len * [1 - range_ratio, 1 + range_ratio]."""

    def lengths(n: int, d: DatasetOptions, rng: np.random.Generator) -> list[SampleRequest]:
        lens = rng.uniform(1 - d.range_ratio, 1 + d.range_ratio, size=(n, 2)) * [
            d.random_input_len,
            d.random_output_len,
        ]
        return [
            SampleRequest([], *fit_context(int(p), int(o), max_model_len))
            for p, o in np.maximum(lens.round().astype(int), 1)
        ]

    base = DatasetOptions(random_input_len=input_len, random_output_len=output_len)
    return plan(parse_phases(spec, base), seed, lengths)


def reversed_requests(requests: list[SampleRequest], duration_s: float | None = None) -> list[SampleRequest]:
    """The trace played backwards: a request at t arrives at T - t (T: the last arrival), so its load and length
    mix drift the other way; cut at `duration_s` of the new clock."""
    if not requests:
        return []
    end = max(r.arrival_s for r in requests)
    out = [SampleRequest(r.prompt, r.prompt_len, r.output_len, end - r.arrival_s, r.phase) for r in requests]
    out.sort(key=lambda r: r.arrival_s)
    return [r for r in out if duration_s is None or r.arrival_s < duration_s]


def drifting_gamma_phases(
    tokens_per_s: float,
    phase_s: float = 60.0,
    phases: int = 20,
    period: int = 10,
    prompt: tuple[int, int] = (300, 3000),
    output: tuple[int, int] = (300, 40),
    burstiness: float = 0.25,
) -> list[dict]:
    """Bursty Gamma arrivals (CV 2 at burstiness 0.25) whose mean prompt length swings between prompt[0] and
    prompt[1] and back every `period` phases (a cosine in log space), the output length the other way between
    output[0] and output[1]: chat turning into document work and back. The rate keeps the tokens a second
    (prompt + output) at `tokens_per_s`, so it is the mix that shifts, not the volume."""
    out = []
    for k in range(phases):
        x = (1 - math.cos(2 * math.pi * k / period)) / 2  # 0 -> 1 -> 0 over a period
        p = prompt[0] * (prompt[1] / prompt[0]) ** x
        o = output[0] * (output[1] / output[0]) ** x
        out.append(
            {
                "name": f"prompt ~{p:.0f}",
                "request_rate": round(tokens_per_s / (p + o), 3),
                "burstiness": burstiness,
                "duration_s": phase_s,
                "input_len": int(p),
                "output_len": int(o),
                "range_ratio": 0.5,
            }
        )
    return out
