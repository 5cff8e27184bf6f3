"""Continuous batching over a pool of paged KV blocks.

Each step gets a token budget. Running requests go first (a decode costs one token, an unfinished prompt
costs a chunk of what is left of the budget: chunked prefill), then waiting requests are admitted while the
budget, `max_num_seqs` and free blocks allow. When a running request needs a block and none is free, the
youngest running request is preempted: its blocks are freed and it goes back to the front of the queue, to
recompute its prompt and the tokens it already generated. Nothing is ever dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from remp.request import Request, Status


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


@dataclass
class ScheduledBatch:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make room in req's block table for num_tokens more computed tokens."""
        need = -(-(req.num_computed_tokens + num_tokens) // self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        req.block_ids.extend(blocks)
        return True

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def free(self, req: Request) -> None:
        """Release a finished or aborted request's blocks and forget it."""
        self.forget(req)
        self.pool.release(req.block_ids)
        req.block_ids = []

    def num_blocks_used(self) -> int:
        return sum(len(r.block_ids) for r in self.running)

    def blocks_in_use(self) -> list[int]:
        """The KV blocks running requests hold, sorted."""
        return sorted(b for r in self.running for b in r.block_ids)

    def fit(self, num_blocks: int) -> list[Request]:
        """Preempt the youngest running requests until the blocks in use fit a pool of num_blocks."""
        preempted = []
        while sum(len(r.block_ids) for r in self.running) > num_blocks:
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
        return preempted

    def resize(self, num_blocks: int, block_map: dict[int, int]) -> None:
        """A new pool of num_blocks after a topology switch; running requests' blocks renamed by block_map
        (identity for ids not in it). Waiting requests hold no blocks."""
        for req in self.running:
            req.block_ids = [block_map.get(b, b) for b in req.block_ids]
        in_use = {b for r in self.running for b in r.block_ids}
        self.pool = BlockPool(num_blocks)
        self.pool._free = deque(b for b in range(num_blocks) if b not in in_use)

    def forget(self, req: Request) -> None:
        """Drop a request from the queues but keep its blocks (still being written); free() them later."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def schedule(self, busy: frozenset[Request] | set[Request] = frozenset(), micro_batches: int = 1) -> ScheduledBatch:
        """The next batch. Requests in `busy` (in a micro-batch still in the pipeline) are neither scheduled
        nor preempted. With `micro_batches` > 1 (pipeline parallelism) a batch takes at most its share of the
        running requests and of the token budget, so the pipeline's micro-batches balance: a stage works on
        them one after another, and one heavy micro-batch would stall the others behind it at every stage."""
        batch = ScheduledBatch()
        budget = max(1, self.max_num_batched_tokens // micro_batches)
        share = -(-len(self.running) // micro_batches)
        for req in list(self.running):
            if budget <= 0 or len(batch.scheduled) >= share:
                break
            if req in busy or req.status is not Status.RUNNING:
                continue
            n = min(req.num_uncomputed_tokens, budget)
            while not self._grow(req, n):
                # the youngest request that is neither in flight nor already in this batch (req at worst)
                victim = next(
                    r for r in reversed(self.running) if r not in busy and all(r is not s for s, _ in batch.scheduled)
                )
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            batch.scheduled.append((req, n))
            budget -= n
        if batch.preempted:
            return batch  # memory is tight: do not admit anybody this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_uncomputed_tokens, budget)
            if not self._grow(req, n):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            batch.scheduled.append((req, n))
            budget -= n
        return batch
