"""Where the KV blocks in use go in a switch (pure): which new replica takes each running request of each old
replica (among the routes the planner allows), what happens to cached free blocks, and the id every moved block
takes in its new replica's pool. With one replica before and after, every block keeps its id where it can."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from remp.request import Request

Key = tuple[int, int]  # (old replica, block id in its pool)
Route = tuple[int, int]  # (old replica, new replica)
Move = tuple[Key, int]  # a block to a new replica (a block shared by requests that go to two replicas: two moves)


@dataclass
class KVMoves:
    assignment: dict[str, int] = field(default_factory=dict)  # running request id -> new replica
    preempted: list[Request] = field(default_factory=list)  # running requests no new replica has room for
    destination: dict[Move, int] = field(default_factory=dict)  # (block, new replica) -> its id there

    def flows(self, only: set[Move] | None = None) -> dict[Route, tuple[list[int], list[int]]]:
        """route -> (old ids, new ids) of the blocks it moves (only those in `only`, if given)."""
        out: dict[Route, tuple[list[int], list[int]]] = {}
        for ((s, b), d), n in sorted(self.destination.items()):
            if only is None or ((s, b), d) in only:
                old, new = out.setdefault((s, d), ([], []))
                old.append(b)
                new.append(n)
        return out

    def block_maps(self) -> dict[Route, dict[int, int]]:
        return {route: dict(zip(old, new, strict=True)) for route, (old, new) in self.flows().items()}


def plan_kv_moves(
    routes: dict[int, list[int]],
    running: Sequence[Sequence[Request]],
    cached_free: Sequence[Sequence[int]],
    num_blocks: int,
    sticky: dict[str, int] | None = None,
    fixed: dict[Move, int] | None = None,
) -> KVMoves:
    """running[s]: old replica s's running requests, oldest first; cached_free[s]: its free blocks that hold
    cached KV, most recently used first. Each request goes to a new replica among routes[s]: the one `sticky`
    names if it still has room, else the one with the fewest blocks so far that has room; a request that fits
    nowhere is preempted (the youngest, as a pool too small preempts). Cached free blocks follow, while there is
    room. `fixed`: blocks that keep the id chosen before in a new replica (pre-copied), where they still go there.
    A block that requests going to two new replicas share is moved to both."""
    sticky, fixed = sticky or {}, fixed or {}
    held: dict[int, set[Key]] = {d: set() for ds in routes.values() for d in ds}
    moves = KVMoves()
    for s, requests in enumerate(running):
        for req in requests:
            keys = {(s, b) for b in req.block_ids}
            fits = [d for d in routes[s] if len(held[d] | keys) <= num_blocks]
            if not fits:
                moves.preempted.append(req)
                continue
            d = sticky.get(req.request_id)
            if d not in fits:
                d = min(fits, key=lambda d: (len(held[d]), d))
            held[d] |= keys
            moves.assignment[req.request_id] = d
    for s, blocks in enumerate(cached_free):
        for b in blocks:
            fits = [d for d in routes[s] if len(held[d]) < num_blocks]
            if fits:
                held[min(fits, key=lambda d: (len(held[d]), d))].add((s, b))
    for d, keys in held.items():
        for key, n in new_ids(sorted(keys), num_blocks, {k: n for (k, e), n in fixed.items() if e == d and k in keys}):
            moves.destination[(key, d)] = n
    return moves


def new_ids(keys: list[Key], num_blocks: int, fixed: dict[Key, int]) -> list[tuple[Key, int]]:
    """Ids in a pool of num_blocks for the blocks `keys` (each used once): those in `fixed` keep theirs; then,
    the lowest old replica first, each block its own id where it fits and is free; the rest the lowest free ids,
    avoiding ids that blocks hold now where possible (so those can keep theirs in a later switch)."""
    taken = set(fixed.values())
    out = dict(fixed)
    for key in keys:
        if key not in out and key[1] < num_blocks and key[1] not in taken:
            out[key] = key[1]
            taken.add(key[1])
    now = {b for _, b in keys}
    free = (i for i in sorted(range(num_blocks), key=lambda i: i in now) if i not in taken)
    for key in keys:
        if key not in out:
            out[key] = next(free)
    return [(key, out[key]) for key in keys]
