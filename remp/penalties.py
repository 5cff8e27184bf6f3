"""Presence, frequency and repetition penalties, as vLLM applies them: the token history they need lives with the
request on the driver (PenaltyHistory, rebuilt from its tokens at will) and travels with each step as plain
arrays (Penalties); the sampling worker keeps nothing, so a switch or a recovery never changes a token.

On a row's logits, in order: repetition (each token seen in the prompt or the output: a positive logit divided
by the penalty, a negative one multiplied), frequency (minus penalty x the token's count in the output),
presence (minus penalty, once, for each token in the output).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch


class Penalties(NamedTuple):
    """One row's penalties and the history they read, on the wire."""

    presence: float
    frequency: float
    repetition: float
    output_ids: np.ndarray  # int32: the distinct tokens of the output so far
    output_counts: np.ndarray  # int32: how often each occurs there
    seen_ids: np.ndarray  # int32: the distinct tokens of prompt and output (empty when repetition is 1)


class PenaltyHistory:
    """What the penalties read of one request's tokens, updated as tokens are appended. Amortised O(1) per token;
    each step copies out only the distinct ids (never the whole history)."""

    def __init__(self, prompt_ids: Iterable[int], output_ids: Iterable[int] = ()):
        self._seen: dict[int, None] = dict.fromkeys(int(t) for t in prompt_ids)  # insertion-ordered set
        self._seen_arr = np.fromiter(self._seen, dtype=np.int32, count=len(self._seen))
        self._slot: dict[int, int] = {}  # output token -> its index in _ids / _counts
        self._ids = np.zeros(16, dtype=np.int32)
        self._counts = np.zeros(16, dtype=np.int32)
        for t in output_ids:
            self.append(t)

    def append(self, token: int) -> None:
        token = int(token)
        slot = self._slot.get(token)
        if slot is None:
            slot = self._slot[token] = len(self._slot)
            if slot == len(self._ids):
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._ids[slot] = token
            if token not in self._seen:
                self._seen[token] = None
                if len(self._seen) > len(self._seen_arr):
                    self._seen_arr = np.concatenate([self._seen_arr, np.zeros(len(self._seen_arr) + 16, np.int32)])
                self._seen_arr[len(self._seen) - 1] = token
        self._counts[slot] += 1

    def wire(self, presence: float, frequency: float, repetition: float) -> Penalties:
        n = len(self._slot)
        seen = self._seen_arr[: len(self._seen)].copy() if repetition != 1.0 else np.zeros(0, np.int32)
        return Penalties(presence, frequency, repetition, self._ids[:n].copy(), self._counts[:n].copy(), seen)


def penalised_ids(p: Penalties) -> list[np.ndarray]:
    """The token ids whose logits apply_penalties may change (they may repeat)."""
    return [
        p.seen_ids if p.repetition != 1.0 else p.seen_ids[:0],
        p.output_ids if p.frequency or p.presence else p.output_ids[:0],
    ]


def apply_penalties(logits: torch.Tensor, rows: Sequence[int], penalties: Sequence[Penalties]) -> None:
    """Penalise logits[rows[k]] by penalties[k], in place. Elementwise on each row's own entries, so a row's result
    never depends on its batch-mates."""
    if not logits.is_contiguous():
        raise ValueError("apply_penalties: contiguous logits expected")
    V = logits.shape[-1]
    flat = logits.view(-1)
    dt, dev = logits.dtype, logits.device

    def flat_index(sel: list[int], ids: list[np.ndarray]) -> torch.Tensor:
        every = np.concatenate(ids).astype(np.int64)
        if len(every) and (every.min() < 0 or every.max() >= V):
            raise ValueError(f"penalty history has token ids outside the vocabulary [0, {V})")
        return torch.from_numpy(every + np.repeat(np.asarray([rows[k] for k in sel]) * V, [len(i) for i in ids])).to(
            dev
        )

    def per_entry(values: list[float], ids: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.asarray(values, dtype=np.float64), [len(i) for i in ids])).to(dev, dt)

    rep = [k for k, p in enumerate(penalties) if p.repetition != 1.0]
    if rep:
        ids = [penalties[k].seen_ids for k in rep]
        idx, r = flat_index(rep, ids), per_entry([penalties[k].repetition for k in rep], ids)
        x = flat[idx]
        flat[idx] = torch.where(x > 0, x / r, x * r)
    out = [k for k, p in enumerate(penalties) if (p.frequency or p.presence) and len(p.output_ids)]
    if out:
        ids = [penalties[k].output_ids for k in out]
        idx = flat_index(out, ids)
        counts = torch.from_numpy(np.concatenate([penalties[k].output_counts for k in out])).to(dev, dt)
        x = flat[idx]
        x = x - per_entry([penalties[k].frequency for k in out], ids) * counts
        flat[idx] = x - per_entry([penalties[k].presence for k in out], ids)
