"""The engine as the switch driver and recovery see it: a narrow, typed view. They read through it and ask it to
act; only the engine writes its own state (the scheduler, the block table, the executor it holds)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from remp.config import ModelConfig
from remp.engine_args import EngineArgs
from remp.executor import MultiprocExecutor
from remp.request import Request
from remp.step_log import StepLog
from remp.topology import Topology

# what a KV block holds, as far as a switch can tell: ("cached", its content's hash) for a block in the prefix
# cache, else (request id, the block's index in its table, the request's preemptions so far); a block whose
# owner is unchanged between two looks holds the same KV (blocks are append-only while owned)
BlockOwner = tuple[str, int, int] | tuple[str, bytes]


@dataclass
class WorkerFailureGuard:
    recovered: bool = False  # the guarded block was cut short by a recovery


class SwitchHost(Protocol):
    model_config: ModelConfig
    dtype: torch.dtype
    args: EngineArgs  # read-only
    step_log: StepLog  # read-only

    @property
    def executor(self) -> MultiprocExecutor: ...

    @property
    def topology(self) -> Topology: ...

    @property
    def num_kv_blocks(self) -> int: ...

    def blocks_in_use(self) -> list[int]:
        """The KV blocks a switch keeps, sorted: those running requests hold, and the cached free ones."""
        ...

    def block_owners(self, full_only: bool, limit: int | None = None) -> dict[int, BlockOwner]:
        """The owner of each block to keep (full_only: only blocks whose every token's KV is written by steps
        that finished), oldest request first, then cached free blocks; stops before `limit` blocks are passed."""
        ...

    def kv_blocks_for(self, target: Topology) -> int:
        """KV blocks the memory budget buys under `target`; ValueError if too few for max_model_len."""
        ...

    def drain(self) -> None:
        """Finish the micro-batches in flight (their outputs come from the next steps)."""
        ...

    def fit_kv(self, num_blocks: int) -> list[Request]:
        """Make the blocks to keep fit a pool of num_blocks: evict cached free blocks (least recently used
        first), then preempt the youngest running requests; the preempted."""
        ...

    def adopt(self, topology: Topology, num_blocks: int, block_map: dict[int, int]) -> None:
        """The workers run `topology` now with a pool of num_blocks; blocks in use renamed by block_map."""
        ...

    def fatal_worker_errors(self) -> AbstractContextManager[WorkerFailureGuard]:
        """A context in which a lost worker is recovered from (the block is cut short) or ends the engine."""
        ...

    def forget_in_flight(self) -> None:
        """The micro-batches in flight will not come back (a worker was lost) but the KV cache survives."""
        ...

    def requeue_running(self) -> tuple[list[str], int]:
        """The KV cache is lost: forget the micro-batches in flight and the prefix cache, and send every running
        request back to the queue to recompute its KV; their ids and the tokens to recompute."""
        ...


def owners_unchanged(before: dict[int, BlockOwner], now: dict[int, BlockOwner]) -> Iterator[int]:
    """Blocks whose owner is the same in both looks: their KV did not change in between."""
    return (b for b, owner in now.items() if before.get(b) == owner)
