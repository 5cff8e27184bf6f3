"""Continuous batching over a pool of paged KV blocks.

Each step gets a token budget. Running requests go first (a decode costs one token, an unfinished prompt
costs a chunk of what is left of the budget: chunked prefill), then waiting requests are admitted while the
budget, `max_num_seqs` and free blocks allow. When a running request needs a block and none is free, the
youngest running request is preempted: its blocks are freed and it goes back to the front of the queue, to
recompute its prompt and the tokens it already generated. Nothing is ever dropped.

With prefix caching, a request admitted first takes the cached blocks of the longest prefix it shares with
earlier requests (block_pool.py) and computes only the rest; a block is cached once its KV is written (the step
that computed it returned). A waiting request whose next block another running request is computing right now
waits for it rather than computing it a second time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from remp.block_pool import ROOT_HASH, BlockHash, BlockPool, chain_hash
from remp.request import Request, Status


@dataclass
class ScheduledBatch:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to compute)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_caching: bool = False,
    ):
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
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
        req.num_computed_tokens = req.num_cached_blocks = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def free(self, req: Request) -> None:
        """Release a finished or aborted request's blocks and forget it."""
        self.forget(req)
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.num_cached_blocks = 0

    def num_blocks_used(self) -> int:
        """Blocks running requests hold (a block shared by several counts once)."""
        return len({b for r in self.running for b in r.block_ids})

    def blocks_in_use(self) -> list[int]:
        """The blocks whose KV a switch must keep, sorted: those running requests hold and the free ones still
        cached (prefix caching)."""
        return sorted({b for r in self.running for b in r.block_ids} | set(self.pool.cached_free()))

    def fit(self, num_blocks: int) -> list[Request]:
        """Make the blocks to keep fit a pool of num_blocks: preempt the youngest running requests until those
        still running fit, then forget the least recently used cached free blocks that do not."""
        preempted = []
        while self.num_blocks_used() > num_blocks:
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
        self.pool.evict(max(0, len(self.blocks_in_use()) - num_blocks))
        return preempted

    def resize(self, num_blocks: int, block_map: dict[int, int]) -> None:
        """A new pool of num_blocks after a topology switch: running requests' blocks renamed by block_map (the
        same id where it has none), cached free blocks kept where it names them (the others lost their KV).
        Waiting requests hold no blocks."""
        held = {b: block_map.get(b, b) for r in self.running for b in r.block_ids}
        for req in self.running:
            req.block_ids = [held[b] for b in req.block_ids]
        old, sources = self.pool, [(self.pool, {**block_map, **held})]
        self.pool = BlockPool.merged(num_blocks, old.caching, sources, [r.block_ids for r in self.running])
        self.pool.queries, self.pool.hits = old.queries, old.hits

    def block_owners(
        self, full_only: bool, limit: int | None, in_flight: dict[Request, int]
    ) -> dict[int, tuple[str, int, int] | tuple[str, bytes]]:
        """The owner of each block to keep (switch/host.py): a cached block by its hash (its KV is that of the
        content the hash names, whoever holds it), another by (request id, index, preemptions). full_only: only
        blocks whose every token's KV is written (not by a step still in flight). Oldest requests first, then the
        cached free blocks, most recently used first; stops before `limit` blocks are passed."""
        size, out, held = self.block_size, {}, 0
        for r in self.running:
            held += len(r.block_ids)
            if limit is not None and held > limit:
                return out
            blocks = r.block_ids[: (r.num_computed_tokens - in_flight.get(r, 0)) // size] if full_only else r.block_ids
            for i, b in enumerate(blocks):
                h = self.pool.hash_of.get(b)
                out.setdefault(b, ("cached", h) if h is not None else (r.request_id, i, r.num_preemptions))
        for b in self.pool.cached_free():
            held += 1
            if limit is not None and held > limit:
                break
            out[b] = ("cached", self.pool.hash_of[b])
        return out

    def cached_prefix_tokens(self, req: Request) -> int:
        """Tokens of req's prompt this scheduler's prefix cache holds now (a router's hint)."""
        hashes = self._hashes(req)[: (len(req.token_ids) - 1) // self.block_size]
        return len(self.pool.lookup(hashes)) * self.block_size

    def drop_cache(self) -> None:
        """The KV of every block is gone (a lost worker): nothing may be found in the cache any more."""
        self.pool.drop_cache()

    # ---- prefix caching -----------------------------------------------------------------------------------
    def _hashes(self, req: Request) -> list[BlockHash]:
        """The hashes of req's full blocks of tokens (computed or not), extended as it grows."""
        size, hashes = self.block_size, req.block_hashes
        root = ROOT_HASH if req.cache_salt is None else chain_hash(req.cache_salt.encode(), ())
        for i in range(len(hashes), len(req.token_ids) // size):
            hashes.append(chain_hash(hashes[-1] if hashes else root, req.token_ids[i * size : (i + 1) * size]))
        return hashes

    def cache_computed(self, req: Request) -> None:
        """req's blocks that are full of computed KV now (its step returned) become findable by their hash."""
        if not self.pool.caching:
            return
        hashes = self._hashes(req)
        full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        for i in range(req.num_cached_blocks, full):
            self.pool.cache(req.block_ids[i], hashes[i])
        req.num_cached_blocks = max(req.num_cached_blocks, full)

    def _being_computed(self) -> set[BlockHash]:
        """Hashes of full blocks that running requests are about to compute (scheduled or next in line)."""
        out = set()
        for r in self.running:
            hashes = self._hashes(r)
            out.update(hashes[r.num_cached_blocks :])
        return out

    def _reuse_cached(self, req: Request) -> None:
        """A request about to be admitted with nothing computed takes the cached blocks of its longest cached
        prefix (at most all but its last token: that one's logits are needed)."""
        if not self.pool.caching or req.block_ids or req.params.prompt_logprobs is not None:
            return  # (prompt logprobs need every prompt position computed)
        hashes = self._hashes(req)[: (len(req.token_ids) - 1) // self.block_size]
        found = self.pool.lookup(hashes)
        self.pool.take(found)
        req.block_ids = list(found)
        req.num_cached_blocks = len(found)
        req.num_computed_tokens = len(found) * self.block_size

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
        computing = self._being_computed() if self.pool.caching else set()
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            self._reuse_cached(req)
            hashes = req.block_hashes
            if req.num_cached_blocks < len(hashes) and hashes[req.num_cached_blocks] in computing:
                self._unreuse(req)  # its next block is being computed: take it from the cache next time
                continue
            n = min(req.num_uncomputed_tokens, budget)
            if not self._grow(req, n):
                self._unreuse(req)
                break
            self.waiting.remove(req)
            if self.pool.caching:  # as vLLM counts them: tokens looked up, tokens found
                self.pool.queries += len(req.token_ids)
                self.pool.hits += req.num_cached_blocks * self.block_size
            req.status = Status.RUNNING
            self.running.append(req)
            batch.scheduled.append((req, n))
            budget -= n
            if self.pool.caching:
                computing.update(hashes[req.num_cached_blocks :])
        return batch

    def _unreuse(self, req: Request) -> None:
        """A waiting request not admitted after all gives back what it took (see _reuse_cached)."""
        self.pool.release(req.block_ids)
        req.block_ids, req.num_computed_tokens, req.num_cached_blocks = [], 0, 0
