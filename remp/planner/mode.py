"""Switch modes as strategy values. The engine, the switch driver, the simulator, the cost model and the API
all take a `SwitchMode` (or its name, turned into one at the edge by `switch_mode`) and ask it what it does
and what it costs; none of them compares mode names.

- live: the weights and the full KV blocks move while the old topology serves (a background pre-copy); the pause
  moves the KV written since and swaps the shards;
- stop: everything moves in one pause (stop the world);
- restart: the baseline other servers have: stop the workers, start new ones from the checkpoint, recompute the
  KV of every request in flight.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SwitchCost:
    pause_s: float  # every request stalls this long
    precopy_s: float = 0.0  # serving goes on, slowed by `slowdown` (a fraction)
    slowdown: float = 0.0


@dataclass(frozen=True)
class Moves:
    """What a switch between two topologies moves, priced over a link: the slowest receiver's seconds."""

    weights_s: float  # weight bytes over the bandwidth
    kv_s_per_block: float  # KV bytes per block in use over the bandwidth
    weight_bytes: int
    kv_bytes_per_block: int


@dataclass(frozen=True)
class Overheads:
    """The parts of a switch's cost that are not bytes over a link."""

    cutover_s: float  # drain the pipeline, swap process groups and block tables
    restart_s: float  # a cold start: load the checkpoint, start the engine
    precopy_link_share: float  # the share of the link a live pre-copy takes (serving keeps the rest)
    precopy_slowdown: float  # how much a pre-copy slows serving


@dataclass(frozen=True)
class SwitchMode:
    name: str
    precopy: bool  # weights (then full KV blocks) move while the old topology serves
    restarts: bool  # the workers restart from the checkpoint; the KV in flight is recomputed, not moved
    multi_node: bool  # offered on a pool that spans several nodes
    summary: str

    def __str__(self) -> str:
        return self.name

    def price(self, moves: Moves, blocks_in_use: int, dirty_blocks: int | None, o: Overheads) -> SwitchCost:
        """The pause (and, live, the pre-copy) of a switch that moves `moves` with `blocks_in_use` KV blocks; a
        live switch moves `dirty_blocks` in its pause (default: one in 16 in use, the partly written ones)."""
        if self.restarts:
            return SwitchCost(pause_s=o.restart_s)
        if not self.precopy:
            return SwitchCost(pause_s=o.cutover_s + moves.weights_s + moves.kv_s_per_block * blocks_in_use)
        dirty = blocks_in_use // 16 if dirty_blocks is None else dirty_blocks
        precopy = (moves.weights_s + moves.kv_s_per_block * (blocks_in_use - dirty)) / o.precopy_link_share
        return SwitchCost(
            pause_s=o.cutover_s + moves.kv_s_per_block * dirty, precopy_s=precopy, slowdown=o.precopy_slowdown
        )


LIVE = SwitchMode("live", True, False, True, "pre-copy while serving, then a short pause")
STOP = SwitchMode("stop", False, False, True, "everything moves in one pause")
RESTART = SwitchMode("restart", False, True, False, "restart the workers from the checkpoint, recompute the KV")
MODES: dict[str, SwitchMode] = {m.name: m for m in (LIVE, STOP, RESTART)}
MODE_NAMES = tuple(MODES)


def switch_mode(mode: str | SwitchMode) -> SwitchMode:
    """The mode named `mode` (a SwitchMode passes through); ValueError naming the choices otherwise."""
    if isinstance(mode, SwitchMode):
        return mode
    found = MODES.get(mode) if isinstance(mode, str) else None
    if found is None:
        raise ValueError(f"mode must be one of {', '.join(MODE_NAMES)}, not {mode!r}")
    return found
