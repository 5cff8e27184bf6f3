"""The engine as the switch driver and recovery see it: a narrow, typed view. They read through it and ask it to
act; only the engine writes its own state (the scheduler, the block table, the executor it holds)."""

from __future__ import annotations

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

    def running(self, replica: int) -> list[Request]:
        """A replica's running requests, oldest first (read-only)."""
        ...

    def blocks_in_use(self, replica: int) -> list[int]:
        """The KV blocks of a replica a switch keeps, sorted: those its running requests hold, and its cached
        free ones."""
        ...

    def cached_free(self, replica: int) -> list[int]:
        """A replica's free blocks that hold cached KV, most recently used first."""
        ...

    def block_owners(self, replica: int, full_only: bool) -> dict[int, BlockOwner]:
        """The owner of each block of a replica to keep (full_only: only blocks whose every token's KV is written
        by steps that finished)."""
        ...

    def kv_blocks_for(self, target: Topology) -> int:
        """KV blocks (per replica) the memory budget buys under `target`; ValueError if too few for
        max_model_len."""
        ...

    def drain(self) -> None:
        """Finish the micro-batches in flight (their outputs come from the next steps)."""
        ...

    def preempt(self, requests: list[Request]) -> None:
        """Send these running requests back to the queue, to recompute their KV later."""
        ...

    def adopt(
        self, topology: Topology, num_blocks: int, assignment: dict[str, int], block_maps: dict[tuple, dict]
    ) -> None:
        """The workers run `topology` now, each replica with a pool of num_blocks: running request r of old
        replica s runs on in new replica assignment[r], its blocks renamed by block_maps[(s, new replica)]."""
        ...

    def fatal_worker_errors(self) -> AbstractContextManager[WorkerFailureGuard]:
        """A context in which a lost worker is recovered from (the block is cut short) or ends the engine."""
        ...

    def forget_in_flight(self) -> None:
        """The micro-batches in flight will not come back (a worker was lost) but the KV cache survives."""
        ...

    def requeue_running(self, replicas: set[int]) -> tuple[list[str], int]:
        """The KV cache of these replicas is lost: forget their prefix caches and send their running requests
        back to the queue to recompute it; their ids and the tokens to recompute."""
        ...
