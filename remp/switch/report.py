"""What a topology switch (or a restart) did and cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SwitchReport:
    # "live" (weights pre-copied while serving, KV in the pause), "stop" (everything in the pause) or "restart"
    # (stop the workers, reload from the checkpoint, recompute the KV)
    mode: str
    old_topology: str
    new_topology: str
    wall_s: float  # from the request to the resumed serving
    pause_s: float  # the cut-over alone: time no step could run (in-flight micro-batches drained first)
    precopy_s: float = 0.0  # live: from the request until every worker had the new shard ready
    precopy_goal_s: float | None = None  # live: the pre-copy's goal (switch_max_precopy_s)
    # live: how the workers paced it (reshard/pacing.py): the duty allowed while serving, the lowest one used,
    # whether the goal needed more than serving allowed (1.0: it did, serving slowed down more), and the steps'
    # slowdown last measured (during / before; -1: none measured)
    precopy_pace: dict[str, float] = field(default_factory=dict)
    bytes_moved: dict[str, int] = field(default_factory=dict)  # per kind: weights, kv (restart: checkpoint bytes read)
    bytes_moved_in_pause: dict[str, int] = field(default_factory=dict)
    # KV blocks pre-copied, then freed or reassigned before the cut-over: moved for nothing (not in bytes_moved)
    kv_bytes_stale: int = 0
    min_bytes: dict[str, int] = field(default_factory=dict)  # the least any plan must move
    bytes_kept: dict[str, int] = field(default_factory=dict)
    peak_extra_bytes: int = 0  # largest extra memory on one worker during the switch
    peak_extra_bytes_per_worker: list[int] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # request ids preempted for lack of KV blocks
    recomputed_tokens: int = 0  # tokens whose KV must be computed again (restart: every in-flight token)
    kv_blocks_moved: int = 0
    num_kv_blocks: int = 0  # logical KV blocks of the new topology
    executor_bytes_received: int = 0  # what the workers received from peers: bytes_moved + kv_bytes_stale
    worker_seconds: dict = field(default_factory=dict)  # slowest worker's time per part of the switch
    # serving while it ran: output tokens/s in the pre-copy window and in as long a window just before it
    tokens_per_s_before: float | None = None
    tokens_per_s_during: float | None = None
    longest_step_gap_s: float = 0.0  # longest time between two finished steps, the pause included
    fallback: str | None = None  # why a live switch ran as stop-the-world (e.g. the staging budget)
    pool_size: int = 0  # workers in the pool afterwards (a switch grows or shrinks it to tp*pp)
    cause: str = "request"  # or "worker_lost": a recovery onto the survivors (or replacements)
    bytes_from_checkpoint: dict[str, int] = field(default_factory=dict)  # pieces only lost workers held
    lost_workers: list[int] = field(default_factory=list)  # their ranks in the pool before the loss
    # each worker's memory by kind (remp/memory.py: weights, execution, kv, staging, runtime, unaccounted, and
    # their total, the RSS), in rank order: from its last heartbeat before the switch, and measured right after
    # the commit, once the old shard and the staging were given back (workers the new topology leaves idle hold
    # nothing then, and exit)
    memory_before: list[dict | None] = field(default_factory=list)
    memory_after: list[dict | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
