"""The performance model's interface: how long one micro-batch takes on one pipeline stage of a topology, how
long its hand-off to the next stage takes, and how many KV tokens the topology can hold. Two sources implement
it: H100 figures (h100.py) and a profile measured on this machine (measured.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Batch:
    """The work of one micro-batch, as the scheduler made it."""

    tokens: int  # tokens computed (prefill chunks + one per decoding sequence)
    seqs: int  # sequences in the batch
    kv_tokens: int  # sum over sequences of the context attended (cached + new)
    attn_pairs: int  # sum over sequences of new tokens x context (query-key pairs, for prefill FLOPs)
    sampled: int  # sequences that sample a token (decode, or the last prefill chunk)

    @staticmethod
    def of(chunks: list[tuple[int, int, bool]]) -> Batch:
        """From (computed before, new tokens, samples) per sequence."""
        return Batch(
            tokens=sum(n for _, n, _ in chunks),
            seqs=len(chunks),
            kv_tokens=sum(c + n for c, n, _ in chunks),
            attn_pairs=sum(n * (c + (n + 1) // 2) for c, n, _ in chunks),
            sampled=sum(s for *_, s in chunks),
        )


class PerfModel(Protocol):
    name: str

    def stage_s(self, tp: int, pp: int, batch: Batch) -> float:
        """Seconds the slowest stage of TPtp x PPpp is busy with `batch` (embedding and lm-head included)."""
        ...

    def hop_s(self, tp: int, pp: int, batch: Batch) -> float:
        """Seconds to hand `batch`'s hidden states from one stage to the next (the mean of the pp - 1 hand-offs,
        some of which may cross nodes)."""
        ...

    def busy_factor(self, tp: int, pp: int, active: int) -> float:
        """stage_s is a stage's time with all pp stages working; this scales it when only `active` of them work
        (below 1 where stages share cores, 1 on dedicated devices)."""
        ...

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        """KV tokens the topology's workers can hold after the weights (the scheduler's block pool)."""
        ...


def iteration_s(model: PerfModel, tp: int, pp: int, batch: Batch) -> float:
    """Latency of one micro-batch through every stage: pp stage times plus pp-1 hand-offs."""
    return pp * model.stage_s(tp, pp, batch) + (pp - 1) * model.hop_s(tp, pp, batch)
