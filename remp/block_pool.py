"""The engine's KV blocks: reference counts, a free list in LRU order, and (prefix caching) a table of full blocks
by the hash of their content, so a request whose prompt starts like an earlier one reuses its KV.

A block is referenced by the requests whose block tables hold it (several, when they share a prefix). With no
reference it is free; a free block that is cached keeps its KV and its hash until the free list hands it out
again (least recently freed first), and a request that finds it by hash takes it back. A block's hash chains
its parent's, so equal hashes mean equal prefixes, not just an equal block; it is a 128-bit digest, so a
collision is out of reach. Block ids are the same on every worker; a switch renames them (`rename`).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
ROOT_HASH: BlockHash = b""


def chain_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The hash of a full block of `tokens` that follows the block hashed `parent` (ROOT_HASH for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int, caching: bool = False):
        self.num_blocks, self.caching = num_blocks, caching
        self.refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.hash_of: dict[int, BlockHash] = {}
        self._by_hash: dict[BlockHash, int] = {}
        self.queries = self.hits = 0  # prefix cache lookups and hits, in tokens (as vLLM counts them)

    @property
    def num_free(self) -> int:
        """Blocks no request references (cached or not): what allocate() can hand out."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """n free blocks (the least recently freed first; a cached one forgets its KV), or None if too few."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._uncache(b)
            self.refs[b] = 1
            out.append(b)
        return out

    def take(self, blocks: Iterable[int]) -> None:
        """One more reference to each of `blocks` (cached blocks a request found)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self._free[b]
            self.refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One reference less to each block; a block nobody references is free. Released in reverse order, so a
        sequence's last blocks are the first to go and its prefix stays cached longest."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None

    # ---- prefix caching -----------------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (a request's full blocks)."""
        found = []
        for h in hashes if self.caching else ():
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def cache(self, block: int, h: BlockHash) -> None:
        """`block` now holds the KV of the full block hashed `h`; another block with the same content keeps its
        place (this one then stays uncached)."""
        if self.caching and block not in self.hash_of and h not in self._by_hash:
            self.hash_of[block] = h
            self._by_hash[h] = block

    def is_cached(self, h: BlockHash) -> bool:
        return h in self._by_hash

    def _uncache(self, b: int) -> None:
        h = self.hash_of.pop(b, None)
        if h is not None:
            del self._by_hash[h]

    def drop_cache(self) -> None:
        """Forget every cached block (their KV is gone, e.g. with a lost worker)."""
        self.hash_of.clear()
        self._by_hash.clear()

    def cached_free(self) -> list[int]:
        """Free blocks that still hold cached KV, most recently freed first."""
        return [b for b in reversed(self._free) if b in self.hash_of]

    def evict(self, n: int) -> None:
        """Forget the n least recently freed cached blocks (they stay free)."""
        for b in [b for b in self._free if b in self.hash_of][:n]:
            self._uncache(b)

    @classmethod
    def merged(
        cls,
        num_blocks: int,
        caching: bool,
        sources: list[tuple[BlockPool, dict[int, int]]],
        held: Iterable[Sequence[int]],
    ) -> BlockPool:
        """A pool of num_blocks after a switch moved blocks of the `sources` pools, block b of a source to
        block_map[b] (several sources when replicas merge): `held` are the block tables of the requests that
        run on here. Blocks not in a map are gone; moved blocks keep their hash (the first of equal ones), and
        free cached ones their LRU order (source by source). The counts of queries and hits are the caller's."""
        new = cls(num_blocks, caching)
        for table in held:
            for b in table:
                new.refs[b] += 1
        moved_free = []
        for pool, block_map in sources:
            lru_rank = {b: i for i, b in enumerate(pool._free)}
            for old, b in sorted(block_map.items(), key=lambda kv: lru_rank.get(kv[0], -1)):
                h = pool.hash_of.get(old)
                if h is not None and h not in new._by_hash:
                    new.hash_of[b] = h
                    new._by_hash[h] = b
                if new.refs[b] == 0:
                    moved_free.append(b)
        kept = set(moved_free)
        empty = [b for b in range(num_blocks) if new.refs[b] == 0 and b not in kept]
        # free blocks without KV first (handed out first), then the moved ones in their LRU order
        new._free = OrderedDict((b, None) for b in empty + moved_free)
        return new
