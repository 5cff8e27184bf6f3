"""What the driver sends the workers each step, and what comes back. Plain tuples: pickled every step."""

from __future__ import annotations

from typing import NamedTuple

from remp.model.attention import SeqChunk
from remp.sampler import SamplerOutput, SampleRow


class StepMsg(NamedTuple):
    step_id: int
    chunks: list[SeqChunk]
    rows: list[SampleRow]  # one per chunk with sample=True, in order


class StepResult(NamedTuple):
    step_id: int
    sampled: SamplerOutput
    worker_s: float  # sampler worker: message received -> result ready (includes waiting for upstream stages)
