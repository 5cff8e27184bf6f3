"""A topology is a value: TP degree, PP degree, layer split, and which worker holds each coordinate."""

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
    # placement[stage * tp + tp_rank] = worker rank. Default: stage-major, worker i = coordinate i.
    placement: tuple[int, ...] | None = None
    layers_per_stage: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.tp, int) and isinstance(self.pp, int)) or self.tp < 1 or self.pp < 1:
            raise ValueError(
                f"tensor and pipeline parallel sizes must be positive integers, got tp={self.tp}, pp={self.pp}"
            )
        if self.placement is None:
            object.__setattr__(self, "placement", tuple(range(self.tp * self.pp)))
        if len(self.placement) != self.tp * self.pp or len(set(self.placement)) != len(self.placement):
            raise ValueError(f"placement {self.placement} must name {self.tp * self.pp} distinct workers")
        if self.layers_per_stage is not None:
            object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))

    @property
    def size(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        split = f"[{'+'.join(map(str, self.layers_per_stage))}]" if self.layers_per_stage else ""
        return f"TP{self.tp}xPP{self.pp}{split}"

    def worker(self, stage: int, tp_rank: int) -> int:
        return self.placement[stage * self.tp + tp_rank]

    def coordinate(self, worker: int) -> tuple[int, int] | None:
        """(stage, tp_rank) held by a worker, or None if the worker is idle in this topology."""
        try:
            i = self.placement.index(worker)
        except ValueError:
            return None
        return divmod(i, self.tp)

    def stage_workers(self, stage: int) -> list[int]:
        return [self.worker(stage, r) for r in range(self.tp)]

    @property
    def sampler_worker(self) -> int:
        """The worker that holds the lm-head and samples: TP rank 0 of the last stage."""
        return self.worker(self.pp - 1, 0)

    def validate(self, config: ModelConfig, num_workers: int | None = None) -> None:
        """Raise ValueError with the reason if this topology cannot run the model on a pool of up to
        num_workers workers."""
        if num_workers is not None and self.size > num_workers:
            raise ValueError(f"{self} needs tp*pp = {self.size} workers, but the pool has at most {num_workers}")
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
    """A topology's shape without its placement: dp replicas, each TP tp x PP pp (dp * tp * pp workers). The
    policy, the simulator and the planner's prices speak in shapes; a Topology is one replica placed."""

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


def parse_shape(text: str) -> Shape:
    """ "TP4xPP2" (or "tp4xpp2", "TP4"), "DP2xTP4xPP1" or "DP2xTP2" -> Shape(tp, pp, dp)."""
    m = re.fullmatch(r"(?:DP(\d+)X)?TP(\d+)(?:XPP(\d+))?", text.strip().upper())
    if m is None or not all(int(g) >= 1 for g in m.groups() if g is not None):
        raise ValueError(
            f"cannot read topology {text!r}: write it as TP<n>xPP<m> or DP<d>xTP<n>xPP<m>, e.g. TP4xPP2, DP2xTP4"
        )
    dp, tp, pp = (int(g) if g else 1 for g in m.groups())
    return Shape(tp, pp, dp)
