"""Batched token sampling: greedy, temperature, top-k, top-p, min-p, logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from remp.kernels import sampling as native
from remp.sampling_params import SamplingParams


class SampleRow(NamedTuple):
    """What the sampler needs of one row: the wire form of SamplingParams (cheap to pickle every step)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    logprobs: int | None
    seed: int | None  # per-token seed (see token_seed), None: the sampling process's default RNG
    banned: tuple[int, ...] = ()  # token ids that must not be sampled now (min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @classmethod
    def of(cls, p: SamplingParams, output_index: int, banned: tuple[int, ...] = ()) -> SampleRow:
        seed = None if p.seed is None else token_seed(p.seed, output_index)
        return cls(p.temperature, p.top_p, p.top_k, p.min_p, p.logprobs, seed, banned)


def token_seed(seed: int, output_index: int) -> int:
    """A seeded request draws token i from a generator seeded by (seed, i): sampling is a pure function of
    the logits, so it does not depend on the batch, on preemption, or on which worker samples."""
    return (seed * 0x9E3779B97F4A7C15 + output_index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


@dataclass
class SamplerOutput:
    token_ids: list[int]  # chosen token per row
    logprobs: list[float]  # raw log_softmax (before temperature/top-k/p/min-p) at the chosen token
    ranks: list[int]  # 1-based rank of the chosen token in the raw distribution
    # Per row, top-n (token_id, logprob) sorted desc (n = params.logprobs; [] for None/0).
    # None when no row in the batch asked for top logprobs.
    top_logprobs: list[list[tuple[int, float]]] | None


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request RNG so a seeded request samples the same tokens whatever its batch-mates."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k, then outside its nucleus top-p, with -inf.

    logits: [B, V]; k: [B] long (V = disabled); p: [B] float (1.0 = disabled).
    One stable descending sort for the whole batch, so ties keep the lowest token id first
    (top_k=1 agrees with argmax). Top-p is computed on the top-k-renormalised distribution.
    """
    if k is None and p is None:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    pos = torch.arange(logits.shape[-1], device=logits.device)
    if k is not None:
        sorted_logits.masked_fill_(pos[None, :] >= k[:, None], float("-inf"))
    if p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token if the mass strictly before it already reaches p; the top token always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= p[:, None]
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, sorted_idx, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens whose prob is below min_p * (row's max prob). The max itself always survives."""
    thresh = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return probs.masked_fill(probs < thresh, 0.0)


def _random_sample(logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of `logits` (all rows non-greedy) with the uniforms `u` [rows]."""
    V = logits.shape[-1]
    dev, dt = logits.device, logits.dtype
    temp = torch.tensor([sp.temperature for sp in params], device=dev, dtype=dt)
    logits = logits / temp[:, None]

    ks = [sp.top_k if 0 < sp.top_k < V else V for sp in params]
    ps = [sp.top_p for sp in params]
    k = torch.tensor(ks, device=dev) if any(x < V for x in ks) else None
    p = torch.tensor(ps, device=dev, dtype=dt) if any(x < 1.0 for x in ps) else None
    probs = apply_top_k_top_p(logits, k, p).softmax(dim=-1)
    if any(sp.min_p > 0 for sp in params):
        probs = apply_min_p(probs, torch.tensor([sp.min_p for sp in params], device=dev, dtype=dt))

    # Inverse CDF with one uniform per row: exact sampling from probs (unnormalised is fine), and ~7x cheaper
    # than an exponential race, which needs a random number per vocabulary entry.
    cdf = probs.cumsum(dim=-1)
    # side="right": the first token whose cumulative mass exceeds u; zero-probability tokens never qualify
    u = u.to(dev, dt)[:, None]
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=V - 1)


def draw_uniforms(generators: list[torch.Generator | None], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One uniform per row: a batched draw from the default RNG for unseeded rows, and a per-row draw for a
    seeded row, so that it does not depend on its batch-mates."""
    u = torch.empty(len(generators), device=device, dtype=dtype)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=device, dtype=dtype)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, dtype=dtype, device=g.device, generator=g).to(device)
    return u


def _plain(sp: SamplingParams, vocab: int) -> bool:
    """The row does not filter its distribution (top-k, top-p, min-p): the native kernel can sample it."""
    return (sp.top_k <= 0 or sp.top_k >= vocab) and sp.top_p >= 1.0 and sp.min_p <= 0


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> SamplerOutput:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"batch size {B} but {len(params)} params and {len(generators)} generators")
    # Half precision is too coarse for cumulative sums over a large vocab.
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)

    # one uniform per non-greedy row, drawn in row order whichever path samples the row
    u = torch.zeros(B, dtype=torch.float64)
    rand_rows = [i for i, sp in enumerate(params) if not sp.greedy]
    u[rand_rows] = draw_uniforms([generators[i] for i in rand_rows], x.device, x.dtype).double().cpu()
    # Each row takes a path by its own parameters only, so that its result never depends on its batch-mates:
    # greedy and temperature-only rows one native pass each; rows that filter (top-k, top-p, min-p) torch ops.
    fast = native.available(x.dtype, x.device)
    plain = [i for i, sp in enumerate(params) if fast and _plain(sp, V)]
    filtered = sorted(set(range(B)) - set(plain))
    token_ids = torch.empty(B, dtype=torch.long, device=x.device)
    chosen_lp = torch.empty(B, dtype=x.dtype, device=x.device)
    ranks = torch.empty(B, dtype=torch.long, device=x.device)
    if plain:
        temps = torch.tensor([0.0 if params[i].greedy else params[i].temperature for i in plain], dtype=torch.float64)
        results = native.sample(_rows(x, plain), temps, u[plain].contiguous())
        for dst, src in zip((token_ids, chosen_lp, ranks), results):
            dst[plain] = src.to(dst.dtype)
    if filtered:
        xf = _rows(x, filtered)
        tokens = xf.argmax(dim=-1)  # greedy rows keep this (ties -> lowest id)
        drawn = [k for k, i in enumerate(filtered) if not params[i].greedy]
        if drawn:
            tokens[drawn] = _random_sample(
                xf[drawn], [params[filtered[k]] for k in drawn], u[[filtered[k] for k in drawn]]
            )
        raw = torch.log_softmax(xf, dim=-1)
        lp = raw.gather(-1, tokens[:, None])
        token_ids[filtered], chosen_lp[filtered] = tokens, lp[:, 0]
        ranks[filtered] = (raw > lp).sum(dim=-1) + 1

    top: list[list[tuple[int, float]]] | None = None
    ns = [min(sp.logprobs or 0, V) for sp in params]
    if max(ns, default=0) > 0:
        vals, idx = torch.log_softmax(x, dim=-1).topk(max(ns), dim=-1)  # sorted descending
        vals_l, idx_l = vals.tolist(), idx.tolist()
        top = [list(zip(idx_l[i][:n], vals_l[i][:n])) for i, n in enumerate(ns)]

    return SamplerOutput(
        token_ids=token_ids.tolist(),
        logprobs=chosen_lp.tolist(),
        ranks=ranks.tolist(),
        top_logprobs=top,
    )


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when that is all of x in order (the common case: one path for the batch)."""
    return x if rows == list(range(x.shape[0])) else x[rows]


def sample_rows(logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
    """sample() for wire-form rows: bans tokens (min_tokens) and seeds each seeded row's generator."""
    for i, row in enumerate(rows):
        if row.banned:
            logits[i, list(row.banned)] = float("-inf")
    return sample(logits, rows, [make_generator(r.seed) for r in rows])
