"""A topology is a value: DP replicas of a TP x PP shape, the layer split, and which worker holds each coordinate.

Every replica holds the whole model (the same shards, on its own workers) and its own KV cache; a worker is in
at most one replica. With dp == 1 it is the plain TP x PP topology.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from remp.config import ModelConfig
from remp.sharding import ShardSpec, head_split, layer_split, shard_spec


@dataclass(frozen=True)
class Topology:
    tp: int
    pp: int
    # placement[replica * tp * pp + stage * tp + tp_rank] = worker rank. Default: worker i = coordinate i.
    placement: tuple[int, ...] | None = None
    layers_per_stage: tuple[int, ...] | None = None
    dp: int = 1

    def __post_init__(self) -> None:
        sizes = (self.dp, self.tp, self.pp)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
            raise ValueError(
                f"data, tensor and pipeline parallel sizes must be positive integers, got dp={self.dp}, "
                f"tp={self.tp}, pp={self.pp}"
            )
        if self.placement is None:
            object.__setattr__(self, "placement", tuple(range(self.size)))
        object.__setattr__(self, "placement", tuple(self.placement))
        if len(self.placement) != self.size or len(set(self.placement)) != len(self.placement):
            raise ValueError(f"placement {self.placement} must name {self.size} distinct workers")
        if self.layers_per_stage is not None:
            object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))

    @property
    def replica_size(self) -> int:
        """Workers of one replica: tp * pp."""
        return self.tp * self.pp

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def shape(self) -> Shape:
        """Its shape without the placement (what the policy and the simulator compare)."""
        return Shape(self.tp, self.pp, self.dp)

    def __str__(self) -> str:
        split = f"[{'+'.join(map(str, self.layers_per_stage))}]" if self.layers_per_stage else ""
        return f"{'' if self.dp == 1 else f'DP{self.dp}x'}TP{self.tp}xPP{self.pp}{split}"

    def worker(self, stage: int, tp_rank: int, replica: int = 0) -> int:
        return self.placement[replica * self.replica_size + stage * self.tp + tp_rank]

    def coordinate(self, worker: int) -> tuple[int, int] | None:
        """(stage, tp_rank) held by a worker in its replica, or None if the worker is idle in this topology."""
        try:
            i = self.placement.index(worker)
        except ValueError:
            return None
        return divmod(i % self.replica_size, self.tp)

    def replica_of(self, worker: int) -> int | None:
        """The replica a worker is in, or None if it is idle in this topology."""
        try:
            return self.placement.index(worker) // self.replica_size
        except ValueError:
            return None

    def replica_workers(self, replica: int) -> tuple[int, ...]:
        n = self.replica_size
        return self.placement[replica * n : (replica + 1) * n]

    def replica(self, replica: int) -> Topology:
        """One replica alone: the TP x PP topology of its workers."""
        return Topology(self.tp, self.pp, self.replica_workers(replica), self.layers_per_stage)

    def stage_workers(self, stage: int, replica: int = 0) -> list[int]:
        return [self.worker(stage, r, replica) for r in range(self.tp)]

    @property
    def sampler_worker(self) -> int:
        """The worker that holds the lm-head and samples (replica 0's): TP rank 0 of the last stage."""
        return self.worker(self.pp - 1, 0)

    def sampler_of(self, replica: int) -> int:
        return self.worker(self.pp - 1, 0, replica)

    def validate(self, config: ModelConfig, num_workers: int | None = None) -> None:
        """Raise ValueError with the reason if this topology cannot run the model on a pool of up to
        num_workers workers."""
        if num_workers is not None and self.size > num_workers:
            raise ValueError(f"{self} needs dp*tp*pp = {self.size} workers, but the pool has at most {num_workers}")
        if num_workers is not None and max(self.placement) >= num_workers:
            raise ValueError(f"placement {self.placement} names workers outside the pool of {num_workers}")
        head_split(config.num_attention_heads, config.num_key_value_heads, self.tp)
        layer_split(config.num_hidden_layers, self.pp, list(self.layers_per_stage) if self.layers_per_stage else None)

    def spec(self, config: ModelConfig, worker: int) -> ShardSpec:
        stage, tp_rank = self.coordinate(worker)
        return shard_spec(
            config, self.tp, self.pp, stage, tp_rank, list(self.layers_per_stage) if self.layers_per_stage else None
        )


class Shape(NamedTuple):
    """A topology's shape without its placement (`Topology.shape`): dp replicas, each TP tp x PP pp (dp * tp * pp
    workers). The policy, the simulator and the switch prices speak in shapes: hashable, cheap, comparable."""

    tp: int
    pp: int = 1
    dp: int = 1

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def replica(self) -> Shape:
        """One replica's shape (dp 1)."""
        return Shape(self.tp, self.pp)

    def __str__(self) -> str:
        return shape_name(self)


def shape_name(shape: tuple[int, ...]) -> str:
    """Shape(4, 2) or (4, 2) -> "TP4xPP2", as a Topology prints itself; Shape(4, 1, 2) -> "DP2xTP4xPP1"."""
    s = Shape(*shape)
    return f"TP{s.tp}xPP{s.pp}" if s.dp == 1 else f"DP{s.dp}xTP{s.tp}xPP{s.pp}"


def one_replica(shape: Shape) -> tuple[int, int]:
    """(tp, pp) of a shape that must be one replica (what a script that starts one server per topology runs)."""
    if shape.dp != 1:
        raise ValueError(f"{shape}: one replica (no DP) here")
    return shape.tp, shape.pp


def parse_shape(text: str) -> Shape:
    """ "TP4xPP2" (or "tp4xpp2", "TP4"), "DP2xTP4xPP1" or "DP2xTP2" -> Shape(tp, pp, dp)."""
    m = re.fullmatch(r"(?:DP(\d+)X)?TP(\d+)(?:XPP(\d+))?", text.strip().upper())
    if m is None or not all(int(g) >= 1 for g in m.groups() if g is not None):
        raise ValueError(
            f"cannot read topology {text!r}: write it as TP<n>xPP<m> or DP<d>xTP<n>xPP<m>, e.g. TP4xPP2, DP2xTP4"
        )
    dp, tp, pp = (int(g) if g else 1 for g in m.groups())
    return Shape(tp, pp, dp)
