"""Workloads for the simulator: a production trace (arrivals and lengths), or phases of Poisson / Gamma
arrivals with their own lengths, as `remp bench serve --phases` describes them. Lengths only: no prompts."""

from __future__ import annotations

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

__all__ = ["phased_requests", "trace_requests"]


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
