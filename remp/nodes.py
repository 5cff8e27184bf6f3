"""Which node each worker is on, and what a byte costs between two of them: the planner's view of a pool that
spans machines (pure; the processes and transports are in multinode/)."""

from __future__ import annotations

from dataclasses import dataclass

# The planner's default link figures, in bytes per second: between workers of one machine (shared memory or
# loopback) and between machines (10 GbE). `--intra-node-bandwidth-gbs` / `--inter-node-bandwidth-gbs` set them.
INTRA_NODE_BPS = 5e9
INTER_NODE_BPS = 1.25e9


@dataclass(frozen=True)
class Links:
    nodes: tuple[int, ...]  # nodes[worker rank] = the node it runs on
    intra_Bps: float = INTRA_NODE_BPS
    inter_Bps: float = INTER_NODE_BPS

    @classmethod
    def one_node(cls, workers: int) -> Links:
        return cls((0,) * workers)

    @property
    def multi_node(self) -> bool:
        return len(set(self.nodes)) > 1

    def bandwidth(self, a: int, b: int) -> float:
        return self.intra_Bps if self.nodes[a] == self.nodes[b] else self.inter_Bps

    def stage_homes(self, tp: int, pp: int, workers: list[int]) -> list[int | None]:
        """The node each stage's TP group would sit on with TP inside a node and PP across nodes: stages fill the
        nodes in order (fewest node boundaries between consecutive stages). None: no node has room for it."""
        free: dict[int, int] = {}
        for w in workers:
            free[self.nodes[w]] = free.get(self.nodes[w], 0) + 1
        homes: list[int | None] = []
        for _ in range(pp):
            home = next((n for n in sorted(free) if free[n] >= tp), None)
            if home is not None:
                free[home] -= tp
            homes.append(home)
        return homes
