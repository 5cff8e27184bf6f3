"""What the driver and the workers say to each other over their pipes: one type per command and per reply.

Steps go to every worker and the sampler worker answers; a switch is three commands (prepare, commit or
abort) that every worker answers with its progress. Pickled, so keep what travels every step small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from remp.model.attention import SeqChunk
from remp.planner.plan import Plan
from remp.sampler import SamplerOutput, SampleRow, TokenLogprob
from remp.topology import Topology

# the KV blocks a switch moves, by route (old replica, new replica): their ids in the old replica's pool, and
# the ids they take in the new replica's pool, in the same order
KVFlows = dict[tuple[int, int], tuple[list[int], list[int]]]


# ---- driver -> workers -------------------------------------------------------------------------------------
class StepMsg(NamedTuple):
    step_id: int
    chunks: list[SeqChunk]
    rows: list[SampleRow]  # one per chunk with sample=True, in order


@dataclass
class PrepareSwitch:
    """Create the new topology's process groups; with `precopy`, also start moving and assembling the weights in
    the background while steps go on (live mode). Answered by SwitchProgress("precopied" or "prepared")."""

    switch_id: int
    plan: Plan
    num_blocks: int  # KV blocks of the new pool
    precopy: bool
    precopy_duty: float = 0.3  # the share of wall time the background copy may keep busy


@dataclass
class PrecopyKV:
    """Live mode, after the weights: copy these KV blocks (full, so never written again while their request
    holds them) into the new layout in the background. Answered by SwitchProgress("kv_precopied")."""

    switch_id: int
    flows: KVFlows


@dataclass
class CommitSwitch:
    """The pause: move what is left (all of it in stop mode; in live mode the KV blocks not pre-copied, or
    written or reassigned since), install the new shard."""

    switch_id: int
    flows: KVFlows  # every KV block in use
    clean: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # by route: pre-copied, unchanged since


@dataclass
class AbortSwitch:
    switch_id: int


@dataclass
class Regroup:
    """The pool changed size: leave the current process groups and join generation `generation`'s world as
    `rank` of `world_size`, routing steps by `topology` (the current one, in the new ranks). Queued behind the
    steps already sent, so those finish in the old world; answered by Ready."""

    generation: int
    rank: int
    world_size: int
    init_method: str
    topology: Topology | None  # None: no routing until the switch that follows installs one
    threads: int  # torch threads for this worker in a pool of this size
    drop_shard: bool = False  # a loss cut a commit short: what each worker holds is unknown, hold nothing
    nodes: tuple[int, ...] | None = None  # the node of each rank (None: all on one machine)


@dataclass
class Shutdown:
    pass


# ---- workers -> driver -------------------------------------------------------------------------------------
class StepResult(NamedTuple):
    step_id: int
    sampled: SamplerOutput
    worker_s: float  # sampler worker: message received -> result ready (includes waiting for upstream stages)
    # per chunk that asked for prompt logprobs (chunk index): (logprob, rank, top) of each of its targets
    prompt_logprobs: dict[int, list[TokenLogprob]] | None = None


@dataclass
class Ready:
    """Started (generation -1: a new worker waiting to join), or joined a generation's world."""

    rank: int
    pid: int
    generation: int = 0


@dataclass
class SwitchStats:
    """A worker's account of its part in a switch."""

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_received_in_pause: int = 0
    bytes_from_checkpoint: int = 0
    peak_extra_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went: groups, precopy, transfers, ...

    def add_time(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds


@dataclass
class SwitchProgress:
    rank: int
    switch_id: int
    # "prepared", "precopied", "kv_precopied", "committed", "aborted", or "failed" (then `error` says why)
    stage: str
    stats: SwitchStats | None = None
    error: str | None = None


@dataclass
class Heartbeat:
    """Sent every HEARTBEAT_S by a thread of each worker: one that falls silent is hung (or stopped)."""

    rank: int


HEARTBEAT_S = 0.5


@dataclass
class WorkerFailed:
    """The worker hit an error and is exiting."""

    rank: int
    traceback: str


@dataclass
class StepFailed:
    """A step failed on this worker (often: a peer died mid-step). It stays up, holding its shard, and takes no
    part in steps until the next Regroup: the driver decides between recovery and shutdown."""

    rank: int
    step_id: int
    traceback: str
