"""Workloads for the simulator: a production trace (arrivals and lengths), or phases of Poisson / Gamma
arrivals with their own lengths, as `remp bench serve --phases` describes them. Lengths only: no prompts."""

from __future__ import annotations

import numpy as np

from remp.bench.datasets import (
    DatasetOptions,
    PhaseWindow,
    SampleRequest,
    arrival_offsets,
    arrivals_for_duration,
    parse_phases,
    trace_requests,
)

__all__ = ["phased_requests", "trace_requests"]


def phased_requests(
    spec: str | list, seed: int, input_len: int = 1024, output_len: int = 128, max_model_len: int | None = None
) -> tuple[list[SampleRequest], list[PhaseWindow]]:
    """Phases (JSON as for `remp bench serve --phases`: request_rate, burstiness, duration_s or num_prompts,
    input_len, output_len, range_ratio, name) on one clock; lengths uniform in len * [1 - range_ratio, 1 + range_ratio]."""
    base = DatasetOptions(random_input_len=input_len, random_output_len=output_len)
    out: list[SampleRequest] = []
    windows = []
    start = 0.0
    for k, ph in enumerate(parse_phases(spec, base)):
        rng = np.random.default_rng([seed, k, 1])
        if ph.num_prompts is not None:
            offsets, span = arrival_offsets(int(ph.num_prompts), ph.request_rate, ph.burstiness, rng)
        else:
            offsets, span = (
                arrivals_for_duration(float(ph.duration_s), ph.request_rate, ph.burstiness, rng),
                float(ph.duration_s),
            )
        d = ph.dataset
        lens = rng.uniform(1 - d.range_ratio, 1 + d.range_ratio, size=(len(offsets), 2)) * [
            d.random_input_len,
            d.random_output_len,
        ]
        for off, (p, o) in zip(offsets, np.maximum(lens.round().astype(int), 1)):
            if max_model_len is not None:
                p = min(p, max_model_len - 1)
                o = max(1, min(o, max_model_len - p))
            out.append(SampleRequest([], int(p), int(o), arrival_s=start + float(off), phase=k))
        windows.append(
            PhaseWindow(
                k, ph.name or f"phase {k}", start, start + span, len(offsets), ph.request_rate, ph.burstiness, d.name
            )
        )
        start += span
    return out, windows
