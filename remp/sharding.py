"""Shard specs: what one (stage, tp_rank) coordinate of a topology holds. Pure functions, no tensors.

Heads are split by KV group as evenly as possible, so any TP degree up to the number of q heads works
(9 heads / 3 KV heads on TP=2 gives 6+3). When tp > num_kv_heads each rank holds one KV head, replicated
across the ranks that share it, and that group's q heads are split among them. A mixture of experts is split
by whole experts (each rank runs its experts for every token routed to them); with more ranks than experts some
ranks hold none, and add nothing to the MLP's all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from remp.config import ModelConfig


def split_evenly(n: int, parts: int) -> list[range]:
    """n items in `parts` contiguous ranges, the first n % parts ranges one longer."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append(range(start, start + size))
        start += size
    return out


def head_split(num_heads: int, num_kv_heads: int, tp: int) -> list[tuple[range, range]]:
    """(q heads, kv heads) of each TP rank."""
    if not 1 <= tp <= num_heads:
        raise ValueError(f"tensor parallel size {tp} must be between 1 and the number of attention heads ({num_heads})")
    group = num_heads // num_kv_heads
    if tp <= num_kv_heads:
        return [(range(kv.start * group, kv.stop * group), kv) for kv in split_evenly(num_kv_heads, tp)]
    out = []
    for kv, ranks in enumerate(split_evenly(tp, num_kv_heads)):
        for q in split_evenly(group, len(ranks)):
            out.append((range(kv * group + q.start, kv * group + q.stop), range(kv, kv + 1)))
    return out


def layer_split(num_layers: int, pp: int, split: list[int] | None = None) -> list[range]:
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pipeline parallel size {pp} must be between 1 and the number of layers ({num_layers})")
    if split is None:
        return split_evenly(num_layers, pp)
    if len(split) != pp or sum(split) != num_layers or min(split) < 1:
        raise ValueError(f"layer split {split} must have {pp} positive entries summing to {num_layers}")
    starts = [sum(split[:i]) for i in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, split)]


@dataclass(frozen=True)
class ShardSpec:
    stage: int
    tp_rank: int
    tp_size: int
    pp_size: int
    layers: range
    q_heads: range
    kv_heads: range
    ffn: range
    experts: range  # of a mixture of experts (empty for a dense MLP)
    vocab: range  # rows of the lm-head (the last stage splits the vocabulary over its TP ranks; empty elsewhere)

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_size - 1

    @property
    def is_sampler(self) -> bool:
        """TP rank 0 of the last stage samples, from the logits every rank of its stage computes for its slice
        of the vocabulary (the lm-head is the largest matmul of a decode step: one rank alone would keep the
        others waiting)."""
        return self.is_last_stage and self.tp_rank == 0


def shard_spec(
    config: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    tp_rank: int = 0,
    layers_per_stage: list[int] | None = None,
) -> ShardSpec:
    q, kv = head_split(config.num_attention_heads, config.num_key_value_heads, tp)[tp_rank]
    return ShardSpec(
        stage=stage,
        tp_rank=tp_rank,
        tp_size=tp,
        pp_size=pp,
        layers=layer_split(config.num_hidden_layers, pp, layers_per_stage)[stage],
        q_heads=q,
        kv_heads=kv,
        ffn=split_evenly(config.intermediate_size, tp)[tp_rank],
        experts=split_evenly(config.num_experts, tp)[tp_rank],
        vocab=split_evenly(config.vocab_size, tp)[tp_rank] if stage == pp - 1 else range(0),
    )
