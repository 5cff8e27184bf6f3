"""Batched token sampling: the allowed-token mask of guided decoding and min_tokens' bans, logit bias,
presence / frequency / repetition penalties, then greedy, temperature, top-k, top-p, min-p; and logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from remp.guided.bitmask import unpack_allowed
from remp.kernels import sampling as native
from remp.penalties import Penalties, PenaltyHistory, apply_penalties, penalised_ids
from remp.sampling_params import SamplingParams


class SampleRow(NamedTuple):
    """What the sampler needs of one row: the wire form of SamplingParams and of the request's state that the
    sampling depends on (cheap to pickle every step; the optional fields cost only the rows that use them)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    logprobs: int | None
    seed: int | None  # per-token seed (see token_seed), None: the sampling process's default RNG
    banned: tuple[int, ...] = ()  # token ids that must not be sampled now (min_tokens)
    allowed: np.ndarray | None = None  # guided decoding: the bitmask of the tokens allowed now (remp.guided)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    penalties: Penalties | None = None  # presence / frequency / repetition, with the history they read

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @classmethod
    def of(
        cls,
        p: SamplingParams,
        output_index: int,
        banned: tuple[int, ...] = (),
        *,
        history: PenaltyHistory | None = None,
        mask: np.ndarray | None = None,
    ) -> SampleRow:
        """The row of a request about to sample its output token `output_index`. history: its PenaltyHistory
        (needed when p has penalties); mask: its guided matcher's bitmask for this token (when p.guided)."""
        seed = None if p.seed is None else token_seed(p.seed, output_index)
        if (mask is None) != (p.guided is None):
            raise ValueError("a guided request samples under its matcher's mask, and only a guided one does")
        penalties = None
        if p.has_penalties:
            if history is None:
                raise ValueError("a request with penalties needs its PenaltyHistory")
            penalties = history.wire(p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
        bias = tuple(p.logit_bias.items()) if p.logit_bias else ()
        return cls(p.temperature, p.top_p, p.top_k, p.min_p, p.logprobs, seed, banned, mask, bias, penalties)


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
    logits: torch.Tensor,
    params: Sequence[SamplingParams | SampleRow],
    generators: list[torch.Generator | None],
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
        token_ids[filtered] = tokens
        chosen_lp[filtered], ranks[filtered] = _chosen_logprob_rank(xf, tokens)

    top: list[list[tuple[int, float]]] | None = None
    ns = [min(sp.logprobs or 0, V) for sp in params]
    if max(ns, default=0) > 0:
        top = _top_logprobs(x, ns)

    return SamplerOutput(
        token_ids=token_ids.tolist(),
        logprobs=chosen_lp.tolist(),
        ranks=ranks.tolist(),
        top_logprobs=top,
    )


def _chosen_logprob_rank(x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen tokens' log_softmax in x, and their 1-based rank there."""
    lsm = torch.log_softmax(x, dim=-1)
    lp = lsm.gather(-1, tokens[:, None])
    return lp[:, 0], (lsm > lp).sum(dim=-1) + 1


def _top_logprobs(x: torch.Tensor, ns: list[int]) -> list[list[tuple[int, float]]]:
    """Per row, its top-n (token id, log_softmax) pairs, sorted descending ([] for n = 0)."""
    if max(ns, default=0) == 0:
        return [[] for _ in ns]
    vals, idx = torch.log_softmax(x, dim=-1).topk(max(ns), dim=-1)
    vals_l, idx_l = vals.tolist(), idx.tolist()
    return [list(zip(idx_l[i][:n], vals_l[i][:n])) for i, n in enumerate(ns)]


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when that is all of x in order (the common case: one path for the batch)."""
    return x if rows == list(range(x.shape[0])) else x[rows]


def sample_rows(logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
    """sample() for wire-form rows, in vLLM's order: the allowed-token mask and the bans (-inf: the logprobs see
    these, as vLLM's see the grammar's mask), then logit bias and penalties (the logprobs do not see these: raw,
    as vLLM's by default), then temperature, top-k, top-p, min-p. Each row depends on its own logits and
    parameters only. May overwrite `logits`."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32).contiguous()
    constrain(x, rows)
    generators = [make_generator(r.seed) for r in rows]
    shaped = [i for i, r in enumerate(rows) if r.logit_bias or r.penalties is not None]
    if not shaped:
        return sample(x, rows, generators)
    changed, before = reshape(x, rows, shaped)
    out = sample(x, rows, generators)
    x.view(-1)[changed] = before  # back to the logits before the reshaping, which the logprobs describe
    tokens = [out.token_ids[i] for i in shaped]
    if native.available(x.dtype, x.device):
        lp, rank = native.logprob_rank(x, shaped, tokens)
    else:
        lp, rank = _chosen_logprob_rank(x[shaped], torch.tensor(tokens, device=x.device))
    for i, a, b in zip(shaped, lp.tolist(), rank.tolist()):
        out.logprobs[i], out.ranks[i] = a, b
    if out.top_logprobs is not None:
        for i, t in zip(shaped, _top_logprobs(x[shaped], [min(rows[i].logprobs or 0, x.shape[1]) for i in shaped])):
            out.top_logprobs[i] = t
    return out


def constrain(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """Disallowed tokens (outside a guided row's mask, or banned by min_tokens) to -inf, in place. Where the mask
    allows nothing but banned tokens (a finished grammar allows only EOS, which min_tokens bans), the mask wins:
    a constraint that can only end, ends."""
    V = x.shape[-1]
    masked = [i for i, r in enumerate(rows) if r.allowed is not None]
    if masked:
        masks = np.stack([rows[i].allowed for i in masked]).astype(np.int32)  # a copy: bans clear bits in it
        bits = masks.view(np.uint32)
        for k, i in enumerate(masked):
            if rows[i].banned:
                kept = bits[k].copy()
                for t in rows[i].banned:
                    if t < 32 * len(kept):
                        kept[t >> 5] &= ~np.uint32(1 << (t & 31))
                if kept.any():
                    bits[k] = kept
            if not bits[k].any():
                raise ValueError(f"row {i}: its guided mask allows no token")
        if native.available(x.dtype, x.device):
            native.apply_bitmask(x, masked, masks)
        else:
            allowed = torch.from_numpy(unpack_allowed(masks, V)).to(x.device)
            x[masked] = x[masked].masked_fill_(~allowed, float("-inf"))
    for i, r in enumerate(rows):
        if r.banned and r.allowed is None:
            x[i, list(r.banned)] = float("-inf")


def reshape(x: torch.Tensor, rows: Sequence[SampleRow], shaped: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit bias, then penalties, on rows `shaped` of x, in place. Returns the flat indices into x of the entries
    they change and those entries' values before, to put back (sparse: the rows are not copied)."""
    V = x.shape[-1]
    ids, row_of = [], []  # the token ids whose logits may change, and their rows
    for i in shaped:
        ids.append(np.fromiter((t for t, _ in rows[i].logit_bias), np.int64, len(rows[i].logit_bias)))
        if rows[i].penalties is not None:
            ids += penalised_ids(rows[i].penalties)
        row_of += [i] * (len(ids) - len(row_of))
    every = np.concatenate(ids).astype(np.int64)
    if len(every) and (every.min() < 0 or every.max() >= V):
        raise ValueError(f"logit_bias or penalty token ids outside the vocabulary [0, {V})")
    changed = torch.from_numpy(every + np.repeat(np.asarray(row_of) * V, [len(a) for a in ids])).to(x.device)
    before = x.view(-1)[changed]  # a copy (advanced indexing)
    biased = [i for i in shaped if rows[i].logit_bias]
    if biased:
        idx = np.concatenate([i * V + np.fromiter((t for t, _ in rows[i].logit_bias), np.int64) for i in biased])
        bias = np.concatenate([np.fromiter((b for _, b in rows[i].logit_bias), np.float64) for i in biased])
        x.view(-1)[torch.from_numpy(idx).to(x.device)] += torch.from_numpy(bias).to(x.device, x.dtype)
    pen = [i for i in shaped if rows[i].penalties is not None]
    if pen:
        apply_penalties(x, pen, [rows[i].penalties for i in pen])
    return changed, before


# (logprob, 1-based rank, top-k (token id, logprob) pairs) of one known token
TokenLogprob = tuple[float, int, list[tuple[int, float]]]


def prompt_logprobs(logits: torch.Tensor, chunks: Sequence) -> dict[int, list[TokenLogprob]]:
    """The raw logprob, rank and top-k of each next prompt token, for the chunks that ask (their rows follow the
    sampled ones, chunk by chunk, one per target: SeqChunk.prompt_logprobs)."""
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    out, row = {}, 0
    for i, c in enumerate(chunks):
        if c.prompt_logprobs is None:
            continue
        k, targets = c.prompt_logprobs
        part = x[row : row + len(targets)]
        row += len(targets)
        lp, rank = _chosen_logprob_rank(part, torch.tensor(targets, device=x.device))
        tops = _top_logprobs(part, [min(k, x.shape[1])] * len(targets))
        out[i] = list(zip(lp.tolist(), rank.tolist(), tops))
    return out
