"""What a topology switch (or a restart) did and cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SwitchReport:
    mode: str  # "switch" (in place, peer to peer) or "restart" (stop, reload from the checkpoint, recompute)
    old_topology: str
    new_topology: str
    wall_s: float  # the whole reconfigure() call
    pause_s: float  # time no step could run (after in-flight micro-batches drained)
    bytes_moved: dict[str, int] = field(default_factory=dict)  # per kind: weights, kv (restart: checkpoint bytes read)
    min_bytes: dict[str, int] = field(default_factory=dict)  # the least any plan must move
    bytes_kept: dict[str, int] = field(default_factory=dict)
    peak_extra_bytes: int = 0  # largest extra memory on one worker during the switch
    preempted: list[str] = field(default_factory=list)  # request ids preempted for lack of KV blocks
    recomputed_tokens: int = 0  # tokens whose KV must be computed again (restart: every in-flight token)
    kv_blocks_moved: int = 0
    num_kv_blocks: int = 0  # logical KV blocks of the new topology
    executor_bytes_received: int = 0  # what the workers actually received from peers (equals the plan's moved)
    worker_seconds: dict = field(default_factory=dict)  # slowest worker's time per part of the switch

    def to_dict(self) -> dict:
        return asdict(self)
