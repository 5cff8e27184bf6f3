"""Which data-parallel replica takes a request: the one with the least outstanding work among those whose free KV
cache holds the request now; when none does, the one with the most free KV (it will admit the request first).
Pure: the simulator says what each replica holds. (The engine routes with `replicas.route`, which also counts
its prefix cache; unifying the two is left open.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaLoad:
    outstanding_tokens: int  # tokens its requests still have to compute: prompts not yet prefilled + outputs to go
    free_kv_tokens: int  # KV slots free in its block pool


def route(replicas: Sequence[ReplicaLoad], kv_tokens: int) -> int:
    """The index of the replica for a request that needs `kv_tokens` of KV to start (its prompt); ties go to the
    lowest index, so routing is deterministic."""
    if not replicas:
        raise ValueError("no replica to route to")
    fits = [i for i, r in enumerate(replicas) if r.free_kv_tokens >= kv_tokens]
    if fits:
        return min(fits, key=lambda i: (replicas[i].outstanding_tokens, i))
    return max(range(len(replicas)), key=lambda i: (replicas[i].free_kv_tokens, -i))
